"""The package's knobs: every ``FDIV_*`` environment variable, read here and nowhere else.

A knob is a setting of the machine or the session, not of one loss (those are the arguments of
the API and the fields of the specs). Each has a name, an environment variable, a type and a
default (:data:`KNOBS`; the table is also in ``docs/api.md``). :func:`get` returns its value now:

1. the innermost :func:`config` block that sets it (process-wide, as ``torch``'s own flags), else
2. its environment variable, read at this call (one parser for every variable), else
3. its default.

So nothing depends on import order, and a value set in code for a block wins over the
environment::

    import fdiv_kernels as fk
    with fk.config(check_finite=False, single_pass=False):   # for this block only
        out = fk.loss(h, w, y, divergence="kl")

An environment variable with a value its parser rejects raises ``ValueError`` naming the
variable, at the first call that reads it.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

__all__ = ["KNOBS", "Knob", "config", "get", "knob_table"]

_TRUE = ("1", "true", "on", "yes")
_FALSE = ("0", "false", "off", "no")


def _parse_bool(text: str) -> bool:
    word = text.strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise ValueError(f"expected one of {', '.join(_TRUE + _FALSE)}")


def _parse_positive_int(text: str) -> int:
    value = int(text.strip())
    if value <= 0:
        raise ValueError("expected an integer > 0")
    return value


def _parse_path(text: str) -> Optional[str]:
    return text.strip() or None


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        word = text.strip().lower()
        if word not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}")
        return word
    return parse


@dataclass(frozen=True)
class Knob:
    """One knob: its environment variable, parser (text -> value), default and what it does."""

    env: str
    parse: Callable[[str], Any]
    default: Any
    doc: str


#: every knob, by the name :func:`config` and :func:`get` use
KNOBS: Dict[str, Knob] = {
    "check_finite": Knob(
        "FDIV_CHECK_FINITE", _parse_bool, True,
        "data checks: a NaN/inf input or result raises a ValueError saying why (one host sync per call)"),
    "single_pass": Knob(
        "FDIV_KERNELS_SINGLE_PASS", _parse_bool, True,
        "losses take the one-pass fused path where it applies (off: two-pass, for benchmarks and debugging)"),
    "gpu_chunk_bytes": Knob(
        "FDIV_CUDA_CHUNK_BYTES", _parse_positive_int, 2 ** 30,
        "GPU backends (cuda, triton): bytes of float32 logits per one-pass chunk"),
    "mixed_gemm": Knob(
        "FDIV_CUDA_MIXED_GEMM", _parse_bool, True,
        "CUDA: 16-bit GEMMs with a float32 output (off: float32-output fallbacks)"),
    "triton_autotune": Knob(
        "FDIV_TRITON_AUTOTUNE", _choice("full", "first"), "full",
        "triton kernels: try every tile config (full) or only the first per element size (first)"),
    "jit": Knob(
        "FDIV_KERNELS_JIT", _parse_bool, True,
        "build the C++/CUDA extensions just in time when no ahead-of-time build is installed"),
    "csrc": Knob(
        "FDIV_KERNELS_CSRC", _parse_path, None,
        "directory of the C++/CUDA sources (default: the package's own)"),
    "prebuilt": Knob(
        "FDIV_KERNELS_PREBUILT", _parse_path, None,
        "directory of prebuilt extensions (default: fdiv_kernels/_prebuilt; make gpu-prebuild)"),
}

#: the values set by the :func:`config` blocks in force (a plain dict: ``torch.compile`` reads it while tracing)
_overrides: Dict[str, Any] = {}


def _check_name(name: str) -> Knob:
    if name not in KNOBS:
        raise ValueError(f"unknown knob {name!r}; the knobs are {', '.join(KNOBS)}")
    return KNOBS[name]


def get(name: str) -> Any:
    """The value of knob ``name`` now (module docstring: block, environment, default). Under
    ``torch.compile`` it is read when the graph is traced."""
    knob = _check_name(name)
    if name in _overrides:
        return _overrides[name]
    text = os.environ.get(knob.env)
    if text is None or not text.strip():
        return knob.default
    try:
        return knob.parse(text)
    except ValueError as exc:
        raise ValueError(f"environment variable {knob.env}={text!r}: {exc}") from None


@contextlib.contextmanager
def config(**values: Any) -> Iterator[None]:
    """Set knobs for a block (process-wide; restored on exit, nested blocks included), e.g.
    ``with fk.config(check_finite=False): ...``. Values are Python values (``True``, ``2 ** 28``,
    ``"first"``) or the environment variables' words (``"off"``); ``None`` for a path knob means the
    default."""
    for name, value in values.items():
        knob = _check_name(name)
        if isinstance(value, str) and knob.parse is not _parse_path:
            values[name] = knob.parse(value)
    saved = dict(_overrides)
    _overrides.update(values)
    try:
        yield
    finally:
        _overrides.clear()
        _overrides.update(saved)


def knob_table() -> Tuple[Tuple[str, str, str, str], ...]:
    """``(name, environment variable, default, description)`` of every knob (the docs' table)."""
    return tuple((name, k.env, repr(k.default), k.doc) for name, k in KNOBS.items())
