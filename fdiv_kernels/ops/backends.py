"""Registry of ``token_stats`` backends and the ``backend="auto"`` rule.

A backend implements the fused LM-head primitive on rows that are all valid (the autograd
function in :mod:`fdiv_kernels.ops.token_stats` drops ignored rows before calling it):

``forward(hidden[N, H], weight[V, H], bias[V] | None, labels[N] int64, *, softcap, temperature,
return_entropy) -> (logp[N], lse[N], entropy[N] | None)``

``backward(hidden, weight, bias, labels, lse, entropy, grad_logp, grad_lse, grad_entropy | None,
*, softcap, temperature) -> (grad_hidden[N, H], grad_weight[V, H], grad_bias[V] | None)``

Outputs are float32 (float64 when the inputs are float64). The math every backend implements
is written out in ``docs/math.md`` ("The primitive"). Backends register themselves with
:func:`register_backend`; ``auto`` takes the available backend with the highest priority for
the tensors' device type.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Dict, Tuple

logger = logging.getLogger("fdiv_kernels")


@dataclass(frozen=True)
class Backend:
    """One implementation of the ``token_stats`` contract.

    ``device_types``: the ``torch.device.type`` values it accepts ("cpu", "cuda").
    ``is_available``: returns ``(ok, reason)``; it may be slow the first time (JIT build) and
    should cache its answer. ``priority``: larger wins under ``backend="auto"``.
    """

    name: str
    forward: Callable
    backward: Callable
    device_types: Tuple[str, ...]
    is_available: Callable[[], Tuple[bool, str]]
    priority: int = 0


_BACKENDS: Dict[str, Backend] = {}
_announced: set = set()


def register_backend(backend: Backend) -> None:
    """Add (or replace) a backend under ``backend.name``."""
    _BACKENDS[backend.name] = backend


def backend_names() -> Tuple[str, ...]:
    return tuple(_BACKENDS)


def available_backends(device_type: str | None = None) -> Dict[str, str]:
    """Map every registered backend to ``"available"`` or the reason it is not.

    With ``device_type`` ("cpu"/"cuda"), a backend that does not run on that device type is
    reported as such. Example: ``{"torch": "available", "cpu": "available",
    "triton": "needs a CUDA device (or TRITON_INTERPRET=1 on CPU)", ...}``.
    """
    out = {}
    for name, b in sorted(_BACKENDS.items(), key=lambda kv: -kv[1].priority):
        if device_type is not None and device_type not in b.device_types:
            out[name] = f"does not run on {device_type} tensors (runs on {', '.join(b.device_types)})"
            continue
        ok, reason = b.is_available()
        out[name] = "available" if ok else reason
    return out


def get_backend(name: str, device_type: str) -> Backend:
    """Resolve a backend name ("auto" included) for tensors on ``device_type``."""
    if name == "auto":
        candidates = sorted(
            (b for b in _BACKENDS.values() if device_type in b.device_types),
            key=lambda b: -b.priority,
        )
        for b in candidates:
            if b.is_available()[0]:
                if (device_type, b.name) not in _announced:
                    _announced.add((device_type, b.name))
                    logger.info("fdiv_kernels: backend='auto' chose %r for %s tensors", b.name, device_type)
                return b
        raise RuntimeError(f"no token_stats backend available for {device_type} tensors: {available_backends(device_type)}")
    if name not in _BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose 'auto' or one of {sorted(_BACKENDS)}")
    b = _BACKENDS[name]
    if device_type not in b.device_types:
        raise ValueError(f"backend {name!r} runs on {', '.join(b.device_types)} tensors, got {device_type} tensors")
    ok, reason = b.is_available()
    if not ok:
        raise RuntimeError(f"backend {name!r} is not available: {reason}")
    return b
