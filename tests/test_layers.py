"""The package's layers (docs/design.md), read off the sources with ``ast``: a new back-arrow, a
private torch name, a second reader of the environment or a consumer reaching into the core's
internals fails here rather than in a reader's afternoon. (``make lint`` runs import-linter's
layers and acyclic-siblings contracts, pyproject.toml; these pin what that does not.)"""

import ast
import importlib
import re
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "fdiv_kernels"
SOURCES = sorted(PKG.rglob("*.py"))
CONSUMERS = ("train", "analysis", "integrations")


def _imports(path: Path, *, top_level_only: bool = False):
    """``(module, name)`` pairs ``path`` imports, relative imports resolved (``name`` None for
    ``import a.b``)."""
    tree = ast.parse(path.read_text())
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    if path.name == "__init__.py":
        parts = parts[:-1] + ("__init__",)
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    out = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out.update((a.name, None) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = parts[: len(parts) - node.level] if node.level else ()
            mod = ".".join(base + ((node.module,) if node.module else ()))
            out.update((mod, a.name) for a in node.names)
    return out


def _modules(path: Path):
    return {m if n is None else m for m, n in _imports(path)}


def _rel(path: Path) -> str:
    return str(path.relative_to(PKG))


# ------------------------------------------------------------------------------------------------
# consumers (train, analysis, integrations): the public API and the spec protocol only
# ------------------------------------------------------------------------------------------------

#: what a consumer may import: the package itself (its ``__all__``) and its public top-level modules
#: (the API, the spec protocol, the Hugging Face plumbing and the shared helpers), never the layers
#: below the API (formulas, kernels, autograd, compiled, knobs: internals)
PUBLIC_MODULES = {"fdiv_kernels", "fdiv_kernels.api", "fdiv_kernels.nn", "fdiv_kernels.specs", "fdiv_kernels.hf",
                  "fdiv_kernels.checks", "fdiv_kernels.errors", "fdiv_kernels.collate", "fdiv_kernels.extras",
                  "fdiv_kernels.runs", "fdiv_kernels.data"}


def _public_names(module: str):
    mod = importlib.import_module(module)
    return set(getattr(mod, "__all__", [n for n in vars(mod) if not n.startswith("_")]))


@pytest.mark.parametrize("path", [p for p in SOURCES if _rel(p).split("/")[0] in CONSUMERS], ids=_rel)
def test_consumers_use_only_the_public_api_and_the_spec_protocol(path):
    own = "fdiv_kernels." + _rel(path).split("/")[0]
    bad = []
    for mod, name in _imports(path):
        if not mod.startswith("fdiv_kernels") or mod == own or mod.startswith(own + "."):
            continue
        if own == "fdiv_kernels.analysis" and mod.startswith("fdiv_kernels.train"):
            bad.append(f"{mod}: analysis imports the trainer")
            continue
        if mod.startswith(("fdiv_kernels.train", "fdiv_kernels.analysis", "fdiv_kernels.integrations")):
            continue  # one consumer above another (the trainer runs the alignment metric)
        if name is not None and f"{mod}.{name}" in PUBLIC_MODULES:
            continue  # from fdiv_kernels import hf
        dunder = name is not None and name.startswith("__") and name.endswith("__")
        if mod not in PUBLIC_MODULES:
            bad.append(f"{mod}: not a public module")
        elif name is not None and not dunder and (name.startswith("_") or name not in _public_names(mod)):
            bad.append(f"{mod}.{name}: not in its __all__")
    assert not bad, bad


def test_the_generic_training_loop_knows_no_loss():
    loss_modules = {"fdiv_kernels", "fdiv_kernels.api", "fdiv_kernels.nn", "fdiv_kernels.specs"}
    assert not _modules(PKG / "train" / "trainer.py") & loss_modules


def test_shared_modules_depend_on_no_tool():
    for name in ("errors.py", "collate.py", "runs.py", "data.py", "hf.py"):
        for m in _modules(PKG / name):
            assert not m.startswith(tuple(f"fdiv_kernels.{c}" for c in CONSUMERS)), (name, m)
    top = {m for m in _modules(PKG / "hf.py")}
    assert not {m for m, _ in _imports(PKG / "hf.py", top_level_only=True)
                if m.split(".")[0] in ("transformers", "deepspeed")}, top  # imported lazily


# ------------------------------------------------------------------------------------------------
# the core: no private torch, one reader of the environment, no deprecation shim
# ------------------------------------------------------------------------------------------------

def _attribute_chains(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            chain, cur = [], node
            while isinstance(cur, ast.Attribute):
                chain.append(cur.attr)
                cur = cur.value
            if isinstance(cur, ast.Name):
                yield [cur.id] + chain[::-1], node.lineno


@pytest.mark.parametrize("path", SOURCES, ids=_rel)
def test_no_private_torch_name(path):
    """``torch._C``, ``torch._dynamo``, ... change between releases: the package uses public torch only."""
    tree = ast.parse(path.read_text())
    found = [(".".join(c), ln) for c, ln in _attribute_chains(tree)
             if c[0] == "torch" and any(p.startswith("_") and not p.startswith("__") for p in c[1:])]
    found += [(m, 0) for m, n in _imports(path) if m.startswith("torch") and (
        any(p.startswith("_") for p in m.split(".")[1:]) or (n or "").startswith("_") and not (n or "").startswith("__"))]
    assert not found, found


def test_one_module_reads_the_fdiv_environment_variables():
    readers = {_rel(p) for p in SOURCES if re.search(r"environ[^\n]*FDIV_|getenv\([^\n]*FDIV_", p.read_text())}
    assert readers <= {"knobs.py"}, readers
    from fdiv_kernels import knobs

    assert {k.env for k in knobs.KNOBS.values()} >= {"FDIV_CHECK_FINITE", "FDIV_KERNELS_SINGLE_PASS",
                                                      "FDIV_CUDA_CHUNK_BYTES", "FDIV_TRITON_AUTOTUNE"}


@pytest.mark.parametrize("path", SOURCES, ids=_rel)
def test_no_deprecation_shim(path):
    """0.x renames leave no alias (CHANGELOG.md lists them); from 1.0 on, old names warn. (Filters
    that silence other libraries' warnings are not shims.)"""
    categories = {"DeprecationWarning", "FutureWarning", "PendingDeprecationWarning"}
    raised = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == "warn":
            names = {getattr(a, "id", getattr(a, "attr", None)) for a in node.args + [k.value for k in node.keywords]}
            if names & categories or any("deprecat" in str(getattr(a, "value", "")).lower() for a in node.args):
                raised.append(node.lineno)
    assert not raised, (_rel(path), raised)


def test_knobs_are_read_at_call_time_and_set_for_a_block(monkeypatch):
    import fdiv_kernels as fk
    from fdiv_kernels import knobs

    monkeypatch.setenv("FDIV_CHECK_FINITE", "0")
    assert knobs.get("check_finite") is False
    with fk.config(check_finite=True):
        assert knobs.get("check_finite") is True
        with fk.config(check_finite="off"):
            assert knobs.get("check_finite") is False
        assert knobs.get("check_finite") is True
    monkeypatch.setenv("FDIV_CHECK_FINITE", "maybe")
    with pytest.raises(ValueError, match="FDIV_CHECK_FINITE='maybe'"):
        knobs.get("check_finite")
    with pytest.raises(ValueError, match="unknown knob 'chek_finite'"):
        with fk.config(chek_finite=False):
            pass


# ------------------------------------------------------------------------------------------------
# the trainer and the analysis tools stay readable
# ------------------------------------------------------------------------------------------------

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
