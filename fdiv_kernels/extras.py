"""Optional dependencies: the core (``fk.loss``, ``fk.token_stats``, ``fk.dpo_loss``, ``fk.nn``)
needs only torch; the trainer and the integrations need the packages of a pip extra
(pyproject.toml) and say which when one is missing."""

from __future__ import annotations

import importlib.util
from typing import List

__all__ = ["EXTRA_MODULES", "extra_error", "missing"]

#: what each extra brings that fdiv_kernels imports (pyproject.toml lists the same packages)
EXTRA_MODULES = {
    "train": ("yaml", "safetensors", "transformers", "tqdm", "matplotlib"),
    "hf": ("transformers",),
}


def missing(*modules: str) -> List[str]:
    """The ``modules`` that cannot be imported here (looked up without importing them)."""
    out = []
    for name in modules:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a blocked or half-installed package
            found = False
        if not found:
            out.append(name)
    return out


def extra_error(feature: str, extra: str, cause: ImportError) -> ImportError:
    """The error to raise for ``cause`` (an import of ``feature`` failed): one naming the pip extra
    when a package of the extra is missing, else ``cause`` itself (a bug, not a missing package)."""
    absent = missing(*EXTRA_MODULES[extra])
    if not absent:
        return cause
    return ImportError(f"{feature} needs {', '.join(absent)} (not installed): pip install 'fdiv-kernels[{extra}]'")
