"""The package's layers import downwards only (read off the sources with ``ast``, so a new
back-arrow fails here rather than in a reader's afternoon)."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "fdiv_kernels"


def _imports(path: Path, *, top_level_only: bool = False):
    """Absolute module names ``path`` imports (relative imports resolved against the package)."""
    tree = ast.parse(path.read_text())
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    out = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = parts[: len(parts) - node.level] if node.level else ()
            mod = ".".join(base + ((node.module,) if node.module else ()))
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)  # `from . import steps`
    return out


LOSS_MODULES = {"fdiv_kernels", "fdiv_kernels.train.steps", "fdiv_kernels.train.phases", "fdiv_kernels.losses",
                "fdiv_kernels.nn", "fdiv_kernels.dpo", "fdiv_kernels.specs", "fdiv_kernels.divergences",
                "fdiv_kernels.primal", "fdiv_kernels.ops"}


def test_the_generic_loop_knows_no_loss():
    imports = _imports(PKG / "train" / "trainer.py")
    assert not imports & LOSS_MODULES, imports & LOSS_MODULES


def test_the_accumulation_helper_knows_only_the_log_sum_exp_accumulator():
    """train/accumulate.py (the loop's exact log-mean-exp accumulation) combines numbers; of the
    loss layer it reads only :class:`fdiv_kernels.specs.LogSumExpAccumulator`."""
    imports = _imports(PKG / "train" / "accumulate.py")
    assert imports & LOSS_MODULES == {"fdiv_kernels.specs"}
    assert {m for m in imports if m.startswith("fdiv_kernels.specs.")} == {"fdiv_kernels.specs.LogSumExpAccumulator"}
    assert not {m for m in imports if m.startswith(("fdiv_kernels.train.steps", "fdiv_kernels.train.phases"))}


def test_analysis_uses_the_shared_helpers_not_the_trainers_internals():
    # what analysis/ may still read from train/: the trainer's data-file formats, run layout and
    # model-dir check (errors and collators are shared modules: fdiv_kernels.errors, fdiv_kernels.collate)
    allowed = {"fdiv_kernels.train.data", "fdiv_kernels.train.checkpoint", "fdiv_kernels.train.validate"}
    for path in (PKG / "analysis").glob("*.py"):
        train = {m for m in _imports(path) if m.startswith("fdiv_kernels.train")}
        modules = {m if m.count(".") == 2 else m.rsplit(".", 1)[0] for m in train}
        assert modules <= allowed, (path.name, modules - allowed)
    # the alignment metric runs inside the trainer's evaluation: no trainer import at all
    assert not {m for m in _imports(PKG / "analysis" / "alignment.py") if m.startswith("fdiv_kernels.train")}


def test_shared_modules_depend_on_no_tool():
    for name in ("errors.py", "collate.py"):
        for m in _imports(PKG / name):
            assert not m.startswith(("fdiv_kernels.train", "fdiv_kernels.analysis", "fdiv_kernels.integrations")), \
                (name, m)


def test_old_import_paths_are_the_shared_objects():
    from fdiv_kernels import collate, errors
    from fdiv_kernels.train import data
    from fdiv_kernels.train import errors as train_errors

    for name in ("TrainError", "ConfigError", "DataError", "RunDirectoryError", "ResumeMismatchError",
                 "CheckpointError", "TrainingInterrupted"):
        assert getattr(train_errors, name) is getattr(errors, name), name
    assert data.collate is collate.collate and data.collate_pairs is collate.collate_pairs
    assert data.IGNORE_INDEX == collate.IGNORE_INDEX == -100
    assert data.DataError is errors.DataError


def test_no_function_in_the_trainer_or_the_analysis_tools_is_too_complex():
    """McCabe complexity <= 12 per function (``train_phase`` was 26 before its split into
    resume / wrap / step parts)."""
    too_complex = []
    for path in sorted((PKG / "train").glob("*.py")) + sorted((PKG / "analysis").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and _complexity(node) > 12:
                too_complex.append((path.name, node.name, _complexity(node)))
    assert not too_complex, too_complex


def _complexity(fn) -> int:
    """McCabe's count as ``ruff check --select C901`` makes it: 1 + the ``if``/``elif``, loops (and
    their ``else``), ``except`` handlers (and a ``try``'s ``else``) and ``match`` cases of ``fn``'s
    own body (nested functions count separately)."""
    n = 1
    stack = list(fn.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            continue
        if isinstance(node, (ast.If, ast.ExceptHandler, ast.match_case)):
            n += 1
        elif isinstance(node, (ast.For, ast.AsyncFor, ast.While)):
            n += 1 + bool(node.orelse)
        elif isinstance(node, ast.Try):
            n += bool(node.orelse)
        stack.extend(ast.iter_child_nodes(node))
    return n


def test_dead_code_stays_gone():
    from fdiv_kernels.train import config

    assert not hasattr(config, "dump")


def test_hf_helpers_depend_on_the_core_only():
    for m in _imports(PKG / "hf.py"):
        assert not m.startswith(("fdiv_kernels.train", "fdiv_kernels.integrations", "fdiv_kernels.analysis")), m
    top = _imports(PKG / "hf.py", top_level_only=True)
    assert not {m for m in top if m.split(".")[0] in ("transformers", "deepspeed")}  # imported lazily


def test_integrations_use_the_shared_helpers():
    for name in ("transformers.py", "trl.py", "deepspeed.py"):
        assert not {m for m in _imports(PKG / "integrations" / name) if m.startswith("fdiv_kernels.train")}, name
