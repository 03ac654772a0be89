"""Registry of ``token_stats`` backends and the ``backend="auto"`` rule.

A backend is a pure kernel: it implements the fused LM-head primitive and nothing else. The
autograd functions (:class:`~fdiv_kernels.autograd.token_stats.TokenStatsFunction`,
:class:`~fdiv_kernels.autograd.fused.FusedLossFunction`) do the rest once for all of them: they send a
dtype the backend does not declare in :attr:`Backend.dtypes` (float64 on the native ones) to the
``"torch"`` reference, pass only supervised rows, contiguous tensors and int64 labels, pass
``grad_entropy`` only with the forward's ``entropy``, and capture the backend's options
(:attr:`Backend.options`) at forward for the backward:

``forward(hidden[N, H], weight[V, H], bias[V] | None, labels[N] int64, *, head, return_entropy[, options])
-> (logp[N], lse[N], entropy[N] | None)``

``backward(hidden, weight, bias, labels, lse, entropy, grad_logp, grad_lse, grad_entropy | None, *, head[,
options]) -> (grad_hidden[N, H], grad_weight[V, H], grad_bias[V] | None)``

``head`` is the call's :class:`~fdiv_kernels.specs.HeadSpec` (``head.softcap``: ``None`` for no
soft-cap, a kernel's own encoding, e.g. 0.0 for the C++ code, being the backend's business;
``head.temperature``). ``options`` is passed only to backends that declare :attr:`Backend.options`.
Outputs are float32 (float64 when the inputs are float64). How many logits a backend holds at
once is set in :mod:`fdiv_kernels.kernels.chunk_sizes`. The math every backend implements
is written out in ``docs/math.md`` ("The primitive"). Backends register themselves with
:func:`register_backend`; ``auto`` takes the available backend with the highest priority for
the tensors' device type.

Backends with one-pass kernels (used by :mod:`fdiv_kernels.autograd.fused`) also provide
``single_pass(weight, bias, head, *, return_entropy, need_h, need_w, need_b) -> ChunkKernels``
and ``chunk_tokens(V, H, dtype) -> int`` (supervised tokens per chunk). A ``ChunkKernels``
object lives for one call and has:

* ``dtype``: its compute dtype (float32, or float64 for float64 inputs);
* ``stats(h[n, H], y[n]) -> (logp[n], lse[n], entropy[n] | None)``: one logits GEMM; the chunk's
  logits stay in the object for the next call;
* ``grads(h, y, lse, entropy, g, k, e | None, *, alpha, beta) -> grad_h[n, H] | None``: the
  coefficient from the kept logits, ``grad_h = coef W`` and ``grad_W = beta grad_W + alpha coef^T h``
  (``grad_b`` likewise; the first write ignores ``beta``);
* ``results() -> (grad_W[V, H] | None, grad_b[V] | None)`` (zeros when nothing was written);
* optionally ``argmax() -> [n] int64``: each row's largest logit's index, read off the logits the
  last ``stats`` kept (between ``stats`` and ``grads``; no GEMM): the predicted tokens of
  ``fk.loss(return_token_accuracy=True)`` (``torch``, ``cpu``; elsewhere the autograd layer runs
  the torch backend's kernels for them, :mod:`fdiv_kernels.autograd.predicted`).

Backends with distillation kernels (:func:`fdiv_kernels.distill_loss`) also provide
``distill(weight, bias, teacher_weight | None, teacher_bias | None, spec, *, need_h, need_w, need_b)
-> DistillKernels`` (:attr:`Backend.distill`; attached by :func:`attach_distill`, so that a module
registering a backend needs no change). A ``DistillKernels`` object lives for one call and has
``dtype``, ``chunk_tokens`` (rows per chunk: two float32 ``[rows, V]`` buffers),
``chunk(h[n, H], y[n], wt[n] | None, *, teacher_h=None, teacher_z=None) -> (div[n], nll[n],
grad_h[n, H] | None)`` (both models' logits, the epilogue of
:func:`fdiv_kernels.formulas.distill.chunk_epilogue`, then with row weights ``wt`` the two student
gradient GEMMs; ``wt=None``: values only) and ``results()`` as above
(:mod:`fdiv_kernels.kernels.distill_chunks`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import torch

logger = logging.getLogger("fdiv_kernels")


class ChunkGradBuffers:
    """The float32 ``grad_weight`` / ``grad_bias`` that a backend's single-pass chunk kernels
    accumulate over chunks (``grad_w``, ``grad_b``: ``None`` when not needed). The first chunk writes
    them with ``beta = 0`` (no zero-fill pass); :meth:`results` zero-fills them when no chunk wrote
    (a batch without supervised rows)."""

    grad_w: Optional[torch.Tensor] = None
    grad_b: Optional[torch.Tensor] = None
    _written: bool = False

    def _accumulate_beta(self, beta: float) -> float:
        """The ``beta`` of this chunk's ``grad = beta * grad + alpha * chunk`` (0 for the first)."""
        beta = beta if self._written else 0.0
        self._written = True
        return beta

    def results(self) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        if not self._written:
            for t in (self.grad_w, self.grad_b):
                if t is not None:
                    t.zero_()
        return self.grad_w, self.grad_b


@dataclass(frozen=True)
class Backend:
    """One implementation of the ``token_stats`` contract.

    ``device_types``: the ``torch.device.type`` values it accepts ("cpu", "cuda").
    ``is_available``: returns ``(ok, reason)``; it may be slow the first time (JIT build) and
    should cache its answer. ``priority``: larger wins under ``backend="auto"``.
    ``dtypes``: input dtypes it computes itself; others go to the ``"torch"`` reference.
    ``single_pass`` / ``chunk_tokens``: the one-pass chunk kernels (module docstring), or None.
    ``options``: returns the backend's options in force now (an immutable object), which the
    autograd function captures at forward and passes to ``forward`` and ``backward`` as
    ``options=``; None for a backend without options.
    ``distill``: the distillation chunk kernels (module docstring), or None.
    """

    name: str
    forward: Callable
    backward: Callable
    device_types: Tuple[str, ...]
    is_available: Callable[[], Tuple[bool, str]]
    priority: int = 0
    dtypes: Tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
    single_pass: Optional[Callable] = None
    chunk_tokens: Optional[Callable[[int, int, torch.dtype], int]] = None
    options: Optional[Callable[[], Any]] = None
    distill: Optional[Callable] = None


_BACKENDS: Dict[str, Backend] = {}
_DISTILL: Dict[str, Callable] = {}
_announced: set = set()


def register_backend(backend: Backend) -> None:
    """Add (or replace) a backend under ``backend.name`` (with the distillation kernels attached
    to that name, :func:`attach_distill`, unless it brings its own)."""
    if backend.distill is None and backend.name in _DISTILL:
        backend = dataclasses.replace(backend, distill=_DISTILL[backend.name])
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


#: measured order of the fk backends per device name (fastest first), written by
#: ``python -m bench.rank_backends`` from the GPU check's and ``make bench``'s results in ``bench/results/``.
MEASURED_RANKING = Path(__file__).with_name("measured_ranking.json")


@functools.lru_cache(maxsize=None)
def measured_ranking(device_name: str) -> Tuple[str, ...]:
    """Backends measured on ``device_name`` (e.g. ``"NVIDIA H100 80GB HBM3"``), fastest first; ``()``
    when nothing was measured there."""
    try:
        table = json.loads(MEASURED_RANKING.read_text())
    except (OSError, ValueError):
        return ()
    return tuple(table.get("devices", {}).get(device_name, {}).get("order", ()))


def _device_name(device_type: str) -> str:
    if device_type == "cuda":
        import torch
        if torch.cuda.is_available():
            return torch.cuda.get_device_name()
    if device_type == "cpu":
        return cpu_model_name()
    return ""


@functools.lru_cache(maxsize=None)
def cpu_model_name() -> str:
    """This CPU's model name (``/proc/cpuinfo``; ``platform.processor()`` elsewhere): the key of a CPU
    in :data:`MEASURED_RANKING` (``make bench`` records the same name)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or "unknown"


@functools.lru_cache(maxsize=None)
def cpu_has_bf16_units() -> bool:
    """Whether this CPU has bf16 dot-product units (the ``avx512_bf16`` or ``amx_bf16`` flag of
    ``/proc/cpuinfo``; False where that file is missing): where torch's bf16 GEMMs (oneDNN) beat
    float32 ones."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return bool({"avx512_bf16", "amx_bf16"} & set(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return False


def auto_order(device_type: str) -> Tuple[Backend, ...]:
    """The ``backend="auto"`` order for ``device_type``: backends measured on this device (a GPU or
    CPU model, by ``bench/results``, :data:`MEASURED_RANKING`) in their measured order, then the rest
    by ``priority`` (set from the cost model, ``python -m bench.costmodel``: cuda > triton on GPUs;
    cpu > torch on CPUs). The first available one wins."""
    measured = measured_ranking(_device_name(device_type))
    candidates = [b for b in _BACKENDS.values() if device_type in b.device_types]
    rank = {name: i for i, name in enumerate(measured)}
    return tuple(sorted(candidates, key=lambda b: (rank.get(b.name, len(rank)), -b.priority)))


def get_backend(name: str, device_type: str) -> Backend:
    """Resolve a backend name ("auto" included) for tensors on ``device_type``."""
    if name == "auto":
        candidates = auto_order(device_type)
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
        raise ValueError(f"backend {name!r} runs on {', '.join(b.device_types)} tensors, got {device_type} tensors; "
                         f"backend='auto' picks the fastest available one for {device_type} tensors")
    ok, reason = b.is_available()
    if not ok:
        raise RuntimeError(f"backend {name!r} is not available: {reason}; backend='auto' picks the fastest "
                           "available one (fk.available_backends() lists them)")
    return b


def resolve_backend(name: str, hidden: torch.Tensor) -> Backend:
    """The backend that runs ``hidden``'s device and dtype: ``name`` (or ``auto``'s choice), or the
    ``"torch"`` reference for a dtype the chosen backend does not compute (float64 on native ones)."""
    b = get_backend(name, hidden.device.type)
    if hidden.dtype not in b.dtypes:
        return _BACKENDS["torch"]
    return b


# ---------------------------------------------------------------------------------------------
# Distillation kernels (an optional part of the contract: module docstring)
# ---------------------------------------------------------------------------------------------

def attach_distill(name: str, factory: Callable) -> None:
    """Give the backend ``name`` the distillation kernels ``factory`` (:attr:`Backend.distill`), now
    if it is registered and whenever it is registered again."""
    _DISTILL[name] = factory
    if name in _BACKENDS:
        _BACKENDS[name] = dataclasses.replace(_BACKENDS[name], distill=factory)


def resolve_distill_backend(name: str, hidden: torch.Tensor) -> Backend:
    """:func:`resolve_backend` for :func:`fdiv_kernels.distill_loss`: ``"auto"`` takes the first
    available backend of :func:`auto_order` that implements distillation; a named backend without
    it is a ``ValueError`` listing those that have it."""
    device_type = hidden.device.type
    if name == "auto":
        for b in auto_order(device_type):
            if b.distill is not None and b.is_available()[0]:
                return b if hidden.dtype in b.dtypes else _BACKENDS["torch"]
        raise RuntimeError(f"no backend with distillation kernels is available for {device_type} tensors")
    b = get_backend(name, device_type)
    if b.distill is None:
        have = sorted(n for n, x in _BACKENDS.items() if x.distill is not None)
        raise ValueError(f"backend {name!r} has no distillation kernels; fk.distill_loss runs on "
                         f"{', '.join(have)} (or backend='auto')")
    return b if hidden.dtype in b.dtypes else _BACKENDS["torch"]
