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


def test_the_generic_loop_knows_no_loss():
    imports = _imports(PKG / "train" / "trainer.py")
    banned = {"fdiv_kernels", "fdiv_kernels.train.steps", "fdiv_kernels.train.phases", "fdiv_kernels.losses",
              "fdiv_kernels.nn", "fdiv_kernels.dpo", "fdiv_kernels.specs"}
    assert not imports & banned, imports & banned


def test_analysis_uses_the_shared_helpers_not_the_trainers_internals():
    allowed = {"fdiv_kernels.train.data", "fdiv_kernels.train.errors", "fdiv_kernels.train.checkpoint",
               "fdiv_kernels.train.validate"}  # the trainer's file formats, run layout and model-dir check
    for path in (PKG / "analysis").glob("*.py"):
        train = {m for m in _imports(path) if m.startswith("fdiv_kernels.train")}
        modules = {m if m.count(".") == 2 else m.rsplit(".", 1)[0] for m in train}
        assert modules <= allowed, (path.name, modules - allowed)


def test_hf_helpers_depend_on_the_core_only():
    for m in _imports(PKG / "hf.py"):
        assert not m.startswith(("fdiv_kernels.train", "fdiv_kernels.integrations", "fdiv_kernels.analysis")), m
    top = _imports(PKG / "hf.py", top_level_only=True)
    assert not {m for m in top if m.split(".")[0] in ("transformers", "deepspeed")}  # imported lazily


def test_integrations_use_the_shared_helpers():
    for name in ("transformers.py", "trl.py", "deepspeed.py"):
        assert not {m for m in _imports(PKG / "integrations" / name) if m.startswith("fdiv_kernels.train")}, name
