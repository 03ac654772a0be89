"""The ``"triton"`` token_stats backend: launch wrappers and registration.

Implements the contract of :mod:`fdiv_kernels.kernels.backends` with the kernels of
:mod:`fdiv_kernels.kernels.triton_kernels` (imported on first use, so ``import fdiv_kernels``
never compiles anything and works without triton)::

    forward(hidden[N, H], weight[V, H], bias[V] | None, labels[N] int64, *, head, return_entropy)
        -> (logp[N], lse[N], entropy[N] | None)                              # float32
    backward(hidden, weight, bias, labels, lse, entropy, grad_logp, grad_lse, grad_entropy | None, *, head)
        -> (grad_hidden[N, H], grad_weight[V, H], grad_bias[V] | None)

Inputs: float32, bfloat16 or float16 (``hidden``/``weight`` sharing the dtype), contiguous, int64
labels; outputs and gradients float32. The autograd functions send float64 inputs to the
``"torch"`` reference backend (:attr:`Backend.dtypes`; Triton's fp64 dot has no tensor-core path;
see docs/triton.md).

Devices: CUDA tensors; CPU tensors too when ``TRITON_INTERPRET=1`` (the Triton interpreter:
slow, for tests). ``backend="auto"`` picks this backend on CUDA (priority 20) and never on CPU
(priority -10 under the interpreter). The device types and priority are fixed when the backend
is registered (at import); call :func:`register` again after changing ``TRITON_INTERPRET``.
The kernels themselves follow the variable at each call.

Options (:class:`TritonOptions`): :func:`triton_options` sets them for a block; the autograd
function captures the options in force at the forward and its backward uses those, whatever is in
force when ``backward()`` runs::

    from fdiv_kernels.kernels.triton_backend import triton_options
    with triton_options(filter_eps=2.0 ** -12):   # gradient filtering (off by default)
        out = fk.loss(h, w, y, divergence="js", backend="triton")
    out.loss.backward()                           # filtered, as captured at the forward
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import math
import os
from dataclasses import dataclass, fields, replace
from typing import Iterator, Optional, Tuple

import torch

from .. import knobs
from . import chunk_sizes, lowp
from .backends import Backend, register_backend
from .gemm_chunks import GemmChunkKernels

logger = logging.getLogger("fdiv_kernels")

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class TritonOptions:
    """Knobs of the triton backend (defaults: exact, deterministic).

    ``filter_eps``: gradient filtering. In the backward, a (token block x vocabulary tile) whose
    softmax probabilities are all below ``filter_eps`` and that holds none of the block's labels
    skips its grad_hidden / grad_weight GEMM (grad_bias stays exact). ``None`` = off. Error
    bound in docs/triton.md; 2**-12 is Cut Cross-Entropy's choice for bf16.
    ``allow_tf32``: float32 inputs use TF32 tensor cores (about 1e-3 relative error in the
    logits) instead of exact fp32 FMA dots.
    ``v_splits``: number of vocabulary splits of the forward (each token block is processed by
    that many programs, merged afterwards); ``None`` = chosen from N, V and the SM count.
    ``deterministic``: ``True`` (default) runs two backward kernels that each own their output
    rows (bitwise reproducible); ``False`` runs one kernel per (token, vocabulary) tile that
    recomputes the logits once and accumulates all gradients with fp32 atomics (faster, last
    bits vary from run to run).
    """

    filter_eps: Optional[float] = None
    allow_tf32: bool = False
    v_splits: Optional[int] = None
    deterministic: bool = True


_options = TritonOptions()


def get_options() -> TritonOptions:
    """The options in force now (what a forward captures: :attr:`Backend.options`)."""
    return _options


@contextlib.contextmanager
def triton_options(**changes) -> Iterator[TritonOptions]:
    """Temporarily change :class:`TritonOptions` fields (process-wide, restored on exit).

    A forward run inside the block captures them for its backward. Example:
    ``with triton_options(filter_eps=2**-12): out = fk.loss(..., backend="triton")``. Unknown
    names or bad values raise ``ValueError``.
    """
    global _options
    names = {f.name for f in fields(TritonOptions)}
    unknown = sorted(set(changes) - names)
    if unknown:
        raise ValueError(f"unknown triton option(s) {unknown}; choose from {sorted(names)}")
    eps = changes.get("filter_eps")
    if eps is not None and not (0.0 < float(eps) < 1.0):
        raise ValueError(f"filter_eps must be None or in (0, 1), got {eps}")
    if "deterministic" in changes and not isinstance(changes["deterministic"], bool):
        raise ValueError(f"deterministic must be a bool, got {changes['deterministic']!r}")
    splits = changes.get("v_splits")
    if splits is not None and (not isinstance(splits, int) or splits < 1):
        raise ValueError(f"v_splits must be None or a positive int, got {splits!r}")
    old = _options
    _options = replace(old, **changes)
    try:
        yield _options
    finally:
        _options = old


# --------------------------------------------------------------------------------------------
# Mode and availability.
# --------------------------------------------------------------------------------------------

def interpret_mode() -> bool:
    """True when ``TRITON_INTERPRET=1`` (the Triton interpreter runs kernels on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


_kernels_module = None


def kernels_module():
    """The kernel module, imported on first use and executed again when ``TRITON_INTERPRET`` or the
    knob ``triton_autotune`` changed since (``@triton.jit`` fixes interpreter vs compiled mode, and
    ``@triton.autotune`` its config list, when the module is executed)."""
    global _kernels_module
    if _kernels_module is None:
        from . import triton_kernels
        _kernels_module = triton_kernels
    if (_kernels_module.INTERPRET != interpret_mode()
            or _kernels_module.AUTOTUNE != knobs.get("triton_autotune")):
        _kernels_module = importlib.reload(_kernels_module)
    return _kernels_module


#: Oldest triton release the kernels are tested with (3.6: the GPU machine's; newest tested: 3.9).
#: setup.py's ``triton`` extra requires the same.
MIN_TRITON = (3, 6)


def _version_tuple(version: str) -> Tuple[int, ...]:
    parts = []
    for piece in version.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def is_available() -> Tuple[bool, str]:
    """``(ok, reason)``: triton importable and >= :data:`MIN_TRITON`, and a CUDA device or the
    interpreter."""
    try:
        import triton
    except Exception as exc:  # pragma: no cover - depends on the install
        return False, f"triton is not importable ({type(exc).__name__}: {exc}); pip install 'fdiv-kernels[triton]'"
    found = _version_tuple(getattr(triton, "__version__", "0"))
    if found[:2] < MIN_TRITON:
        need = ".".join(map(str, MIN_TRITON))
        return False, f"triton {triton.__version__} is older than the supported {need} (pip install 'triton>={need}')"
    if interpret_mode():
        return True, ""
    if not torch.cuda.is_available():
        return False, "needs a CUDA device (or TRITON_INTERPRET=1 on CPU)"
    return True, ""


# --------------------------------------------------------------------------------------------
# Launch helpers.
# --------------------------------------------------------------------------------------------

def _check(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> None:
    if hidden.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"triton backend: hidden must be float32, bfloat16 or float16, got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"triton backend: hidden and weight must share a dtype, got {hidden.dtype} and {weight.dtype}")
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"triton backend: expected hidden [N, H] and weight [V, H], got "
                         f"{tuple(hidden.shape)} and {tuple(weight.shape)}")
    if labels.shape != (hidden.shape[0],):
        raise ValueError(f"triton backend: labels must have shape [N]=({hidden.shape[0]},), got {tuple(labels.shape)}")
    dev = hidden.device.type
    if dev not in _device_types():
        raise ValueError(f"triton backend: runs on {', '.join(_device_types())} tensors, got {dev} tensors "
                         "(CPU tensors need TRITON_INTERPRET=1)")


def _input_precision(dtype: torch.dtype, options: TritonOptions) -> str:
    if dtype == torch.float32 and not options.allow_tf32:
        return "ieee"
    return "tf32"


def _scalars(head) -> Tuple[float, float]:
    """The kernels' ``(softcap, 1/T)`` of a :class:`~fdiv_kernels.specs.HeadSpec`; without a soft-cap
    (``HAS_SOFTCAP=False``) the first is unused."""
    return (1.0 if head.softcap is None else float(head.softcap)), 1.0 / float(head.temperature)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def vocab_splits(n: int, v: int, *, align: int, device: torch.device,
                 options: Optional[TritonOptions] = None) -> Tuple[int, int]:
    """``(splits, split_size)`` of the forward: ``split_size`` a multiple of ``align``, every
    split non-empty. Default: enough programs for ~2 waves of the GPU's SMs, each split at least
    ``4 * align`` columns; 1 on CPU (interpreter) unless ``v_splits`` is set (in ``options``,
    default: the options in force)."""
    want = (options or _options).v_splits
    if want is None:
        if device.type == "cuda":
            sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
            token_blocks = max(1, math.ceil(n / 64))
            want = max(1, min(math.ceil(2 * sms / token_blocks), math.ceil(v / (4 * align))))
        else:
            want = 1
    split_size = math.ceil(math.ceil(v / want) / align) * align
    return math.ceil(v / split_size), split_size


def _on_device(device: torch.device):
    """Context for a launch: the tensors' GPU made current (triton launches on the current
    device, which need not hold the tensors), as the CUDA backend does; nothing on CPU."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float32).contiguous()


# --------------------------------------------------------------------------------------------
# The contract.
# --------------------------------------------------------------------------------------------

def forward(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], labels: torch.Tensor, *,
            head, return_entropy: bool = False, options: Optional[TritonOptions] = None):
    """``(logp[N], lse[N], entropy[N] | None)`` in float32; see the module docstring. ``options``:
    the :class:`TritonOptions` to use (default: those in force)."""
    options = options or _options
    _check(hidden, weight, labels)
    n, h = hidden.shape
    v = weight.shape[0]
    dev = hidden.device
    if n == 0:
        empty = torch.empty(0, dtype=torch.float32, device=dev)
        return empty, empty.clone(), (empty.clone() if return_entropy else None)
    kern = kernels_module()
    splits, split_size = vocab_splits(n, v, align=kern.SPLIT_ALIGN, device=dev, options=options)
    part = torch.empty((4 if return_entropy else 3, splits, n), dtype=torch.float32, device=dev)
    m, s, zy = part[0], part[1], part[2]
    a = part[3] if return_entropy else m  # unused without entropy
    cap, inv_t = _scalars(head)

    def grid(meta):
        return (math.ceil(n / meta["BLOCK_N"]), splits)

    with _on_device(dev):
        kern.token_stats_fwd_kernel[grid](
            hidden, weight, hidden if bias is None else bias, labels, m, s, a, zy,
            n, v, h, split_size, cap, inv_t,
            HAS_BIAS=bias is not None, HAS_SOFTCAP=head.softcap is not None, WITH_ENTROPY=bool(return_entropy),
            DOT_FP32=kern.INTERPRET, INPUT_PRECISION=_input_precision(hidden.dtype, options),
        )
    return merge_splits(m, s, zy, a if return_entropy else None)


def merge_splits(m: torch.Tensor, s: torch.Tensor, zy: torch.Tensor, a: Optional[torch.Tensor]):
    """Merge per-split statistics ``[splits, N]`` into ``(logp, lse, entropy | None)``.

    With M = max_s m_s, r_s = exp(m_s - M): S = sum_s r_s S_s, lse = M + log S,
    A = sum_s r_s (A_s + (m_s - M) S_s) = sum_v exp(z - M) (z - M), ent = log S - A / S,
    logp = sum_s zy_s - lse (only the split holding the label contributes to zy).
    """
    big_m = m.max(dim=0).values
    # a row whose every logit is -inf (a fully masked vocabulary) gets lse = -inf, as on every
    # backend (the data checks report it), not exp(-inf - -inf) = NaN
    r = torch.exp(m - torch.where(big_m == float("-inf"), torch.zeros_like(big_m), big_m))
    big_s = (r * s).sum(0)
    log_s = torch.log(big_s)
    lse = big_m + log_s
    logp = zy.sum(0) - lse
    ent = None
    if a is not None:
        # a split whose logits are all -inf (masked vocabulary) has m = -inf, S = A = 0: it adds 0
        shift = torch.where(s > 0, (m - big_m) * s, torch.zeros_like(s))
        big_a = (r * (a + shift)).sum(0)
        ent = log_s - big_a / big_s
    return logp, lse, ent


def backward(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], labels: torch.Tensor,
             lse: torch.Tensor, entropy: Optional[torch.Tensor], grad_logp: torch.Tensor, grad_lse: torch.Tensor,
             grad_entropy: Optional[torch.Tensor], *, head, options: Optional[TritonOptions] = None):
    """``(grad_hidden[N, H], grad_weight[V, H], grad_bias[V] | None)`` in float32.

    Deterministic by default (no atomics: one kernel per output); ``grad_entropy`` comes with the
    forward's ``entropy``. Honours the ``filter_eps``, ``allow_tf32`` and ``deterministic`` of
    ``options`` (default: those in force; the autograd function passes the forward's).
    """
    options = options or _options
    _check(hidden, weight, labels)
    with_ent = grad_entropy is not None
    n, h = hidden.shape
    v = weight.shape[0]
    dev = hidden.device
    grad_h = torch.empty((n, h), dtype=torch.float32, device=dev)
    if n == 0:
        grad_b = None if bias is None else torch.zeros(v, dtype=torch.float32, device=dev)
        return grad_h, torch.zeros((v, h), dtype=torch.float32, device=dev), grad_b
    grad_w = torch.empty((v, h), dtype=torch.float32, device=dev)
    grad_b = None if bias is None else torch.empty(v, dtype=torch.float32, device=dev)
    kern = kernels_module()
    lse_c, g, k = _f32(lse), _f32(grad_logp), _f32(grad_lse)
    ent_c = _f32(entropy) if with_ent else lse_c
    e = _f32(grad_entropy) if with_ent else g
    # float16: the coefficient (cast to fp16 for the GEMMs) is scaled into fp16's range by a power
    # of two, the fp32 outputs back (kernels/lowp.py); on the device, no sync
    scale = lowp.fp16_coef_scale(hidden.dtype, g, k, e if with_ent else None, ent_c if with_ent else None,
                                 head.temperature)
    if scale is not None:
        g, k = g * scale, k * scale
        e = e * scale if with_ent else g
    cap, inv_t = _scalars(head)
    eps = options.filter_eps
    common = dict(
        HAS_BIAS=bias is not None, HAS_SOFTCAP=head.softcap is not None, WITH_ENTROPY=with_ent,
        FILTER=eps is not None, DOT_FP32=kern.INTERPRET, INPUT_PRECISION=_input_precision(hidden.dtype, options),
    )
    b_arg = hidden if bias is None else bias
    args = (hidden, weight, b_arg, labels, lse_c, ent_c, g, k, e)
    scalars = (n, v, h, cap, inv_t, 0.0 if eps is None else float(eps))
    gb_arg = grad_h if grad_b is None else grad_b
    with _on_device(dev):
        if not options.deterministic:
            grad_h.zero_()
            grad_w.zero_()
            if grad_b is not None:
                grad_b.zero_()
            kern.token_stats_bwd_fused_atomic_kernel[
                lambda meta: (math.ceil(n / meta["BLOCK_N"]) * math.ceil(v / meta["BLOCK_V"]),)](
                *args, grad_h, grad_w, gb_arg, *scalars, **common)
        else:
            kern.token_stats_bwd_hidden_kernel[lambda meta: (math.ceil(n / meta["BLOCK_N"]),)](
                *args, grad_h, *scalars, **common)
            kern.token_stats_bwd_weight_kernel[lambda meta: (math.ceil(v / meta["BLOCK_V"]),)](
                *args, grad_w, gb_arg, *scalars, **common)
    if scale is not None:
        for t in (grad_h, grad_w, grad_b):
            if t is not None:
                t.div_(scale)
    return grad_h, grad_w, grad_b


# --------------------------------------------------------------------------------------------
# One-pass chunk kernels (fdiv_kernels/autograd/fused.py).
# --------------------------------------------------------------------------------------------

class ChunkKernels(GemmChunkKernels):
    """One-pass chunk kernels of the ``triton`` backend: the shared GEMM driver
    (:mod:`fdiv_kernels.kernels.gemm_chunks`, cuBLAS GEMMs) with the Triton chunk epilogues of
    :mod:`fdiv_kernels.kernels.triton_kernels` (no nvcc needed; under ``TRITON_INTERPRET=1`` on CPU
    tensors too). The coefficient is written over the logits' rows, as the cuda backend does."""

    def __init__(self, weight, bias, head, *, return_entropy, need_h, need_w, need_b) -> None:
        super().__init__(weight, bias, head, return_entropy=return_entropy, need_h=need_h, need_w=need_w,
                         need_b=need_b)
        self.kern = kernels_module()
        self.cap, self.inv_t = _scalars(head)

    def _flags(self, with_entropy: bool) -> dict:
        return dict(HAS_BIAS=self.b is not None, HAS_SOFTCAP=self.softcap is not None, WITH_ENTROPY=with_entropy,
                    BLOCK=self.kern.CHUNK_BLOCK, num_warps=8, enable_fp_fusion=False)

    def forward_epilogue(self, z, y):
        n = z.shape[0]
        lse = torch.empty(n, dtype=torch.float32, device=z.device)
        logp = torch.empty_like(lse)
        ent = torch.empty_like(lse) if self.return_entropy else None
        with _on_device(z.device):
            self.kern.chunk_fwd_epilogue_kernel[(n,)](
                z, z.stride(0), z if self.b is None else self.b, y, lse, logp, lse if ent is None else ent,
                z.shape[1], self.cap, self.inv_t, **self._flags(ent is not None))
        return logp, lse, ent

    def coef_epilogue(self, z, coef, y, lse, ent, g, k, e) -> None:
        with_ent = e is not None
        lse_c, g_c, k_c = _f32(lse), _f32(g), _f32(k)
        with _on_device(z.device):
            self.kern.chunk_coef_epilogue_kernel[(z.shape[0],)](
                z, z.stride(0), coef, coef.stride(0), z if self.b is None else self.b, y, lse_c,
                _f32(ent) if with_ent else lse_c, g_c, k_c, _f32(e) if with_ent else g_c, z.shape[1], self.cap,
                self.inv_t, **self._flags(with_ent))


# --------------------------------------------------------------------------------------------
# Registration.
# --------------------------------------------------------------------------------------------

def _device_types() -> Tuple[str, ...]:
    return ("cuda", "cpu") if interpret_mode() else ("cuda",)


def register() -> Backend:
    """(Re)register ``"triton"`` for the current ``TRITON_INTERPRET`` mode and return it.

    Normal: runs on cuda, priority 20. Interpreter: cuda and cpu, priority -10 (``auto`` never
    prefers the interpreter over the torch reference).
    """
    backend = Backend(
        name="triton",
        forward=forward,
        backward=backward,
        device_types=_device_types(),
        is_available=is_available,
        priority=-10 if interpret_mode() else 20,
        dtypes=SUPPORTED_DTYPES,
        single_pass=ChunkKernels,
        chunk_tokens=chunk_sizes.gpu_chunk_tokens,
        options=get_options,
    )
    register_backend(backend)
    return backend


register()
