"""The ``"cuda"`` backend: cuBLAS GEMMs per chunk + lean CUDA epilogues (``csrc/cuda``).

Same contract as :mod:`fdiv_kernels.kernels.torch_chunked`. Per chunk of ``chunk_sizes.cuda_two_pass_rows(V)``
token rows:

* forward: ``raw = h @ W.T`` (bf16/fp16 operands with a float32 output through
  ``torch.mm(..., out_dtype=float32)``; float32 GEMM for float32 inputs), then one CUDA block per
  row adds the bias, applies soft-cap/temperature and runs an online log-sum-exp that also
  yields the label log-prob and the entropy (one read of the logits);
* backward: ``raw`` is recomputed, an elementwise kernel writes the coefficient
  ``dL/draw`` in the weight's dtype, and ``grad_hidden = coef @ W`` and ``grad_weight += coef^T h``
  (float32 accumulators) use that same chunk.

For bf16/fp16 inputs the coefficient is rounded to the input dtype before the two backward
GEMMs (as in Liger and Cut Cross-Entropy), so gradients agree with the float32 reference to
bf16/fp16 precision; for fp16 it is first scaled by a power of two into fp16's range
(:mod:`.lowp`). Forward values are computed from float32 logits. float64 inputs go to the
torch reference (:attr:`Backend.dtypes`). The extension is built on first use (needs nvcc; see docs/building.md).
"""

from __future__ import annotations

from typing import Optional

import torch

from . import chunk_sizes, gemm_chunks, lowp, native
from .backends import Backend, register_backend
from .gemm_chunks import GemmChunkKernels


def _call(run, dtype: torch.dtype):
    """``run(mixed_gemm)`` with bf16/fp16 x bf16/fp16 -> fp32 GEMMs where this torch has them
    (:func:`.gemm_chunks.mixed_gemm_supported`); if torch lacks them, once more without."""
    mixed = gemm_chunks.mixed_gemm_supported()
    try:
        return run(mixed)
    except RuntimeError as exc:
        if not mixed or "dtype" not in str(exc).lower():
            raise
        gemm_chunks.mixed_gemm_unsupported(exc, dtype)
        return run(False)


def _is_reduced(t: torch.Tensor) -> bool:
    return t.dtype in (torch.bfloat16, torch.float16)


def forward(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], labels: torch.Tensor, *,
            head, return_entropy: bool = False):
    """Contract forward; returns ``(logp[N], lse[N], entropy[N] | None)`` float32."""
    mod = native.load("cuda")
    with torch.no_grad(), torch.cuda.device(hidden.device):
        stream = torch.cuda.current_stream(hidden.device).cuda_stream

        def run(mixed):
            return mod.forward(hidden, weight, bias, labels, native.softcap_arg(head.softcap), head.temperature,
                               bool(return_entropy),
                               chunk_sizes.cuda_two_pass_rows(weight.shape[0]), mixed and _is_reduced(hidden), stream)

        logp, lse, ent = _call(run, hidden.dtype)
    return logp, lse, (ent if return_entropy else None)


def backward(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], labels: torch.Tensor,
             lse: torch.Tensor, entropy: Optional[torch.Tensor], grad_logp: torch.Tensor, grad_lse: torch.Tensor,
             grad_entropy: Optional[torch.Tensor], *, head):
    """Contract backward; returns ``(grad_hidden, grad_weight, grad_bias | None)`` float32."""
    mod = native.load("cuda")
    with torch.no_grad(), torch.cuda.device(hidden.device):
        stream = torch.cuda.current_stream(hidden.device).cuda_stream
        # float16: the coefficient is scaled into fp16's range and the fp32 outputs back (kernels/lowp.py)
        scale = lowp.fp16_coef_scale(hidden.dtype, grad_logp, grad_lse, grad_entropy, entropy, head.temperature)
        if scale is not None:
            grad_logp, grad_lse = grad_logp * scale, grad_lse * scale
            grad_entropy = None if grad_entropy is None else grad_entropy * scale

        def run(mixed):
            return mod.backward(hidden, weight, bias, labels, lse, entropy if grad_entropy is not None else None,
                                grad_logp, grad_lse, grad_entropy, native.softcap_arg(head.softcap), head.temperature,
                                chunk_sizes.cuda_two_pass_rows(weight.shape[0]), mixed and _is_reduced(hidden), stream)

        gh, gw, gb = _call(run, hidden.dtype)
        if scale is not None:
            for t in (gh, gw, gb):
                if t is not None:
                    t.div_(scale)
    return gh, gw, (gb if bias is not None else None)


# --------------------------------------------------------------------------------------------
# One-pass chunk kernels (fdiv_kernels/autograd/fused.py)
# --------------------------------------------------------------------------------------------

class ChunkKernels(GemmChunkKernels):
    """One-pass chunk kernels of the ``cuda`` backend: the shared GEMM driver
    (:mod:`fdiv_kernels.kernels.gemm_chunks`) with the CUDA C epilogues of ``csrc/cuda``; the
    coefficient is written over the logits' rows. ``mod`` replaces the extension (the CPU twin
    in the tests)."""

    def __init__(self, weight, bias, head, *, return_entropy, need_h, need_w, need_b, mod=None) -> None:
        super().__init__(weight, bias, head, return_entropy=return_entropy, need_h=need_h, need_w=need_w,
                         need_b=need_b)
        self.mod = native.load("cuda") if mod is None else mod
        self.cap = native.softcap_arg(head.softcap)

    def _stream(self) -> int:
        return torch.cuda.current_stream(self.w.device).cuda_stream if self.w.is_cuda else 0

    def forward_epilogue(self, z, y):
        return self.mod.chunk_forward_epilogue(z, self.b, y, self.cap, self.temperature, self.return_entropy,
                                               self._stream())

    def coef_epilogue(self, z, coef, y, lse, ent, g, k, e) -> None:
        self.mod.chunk_coef_epilogue(z, coef, self.b, y, lse, ent, g, k, e, self.cap, self.temperature, self._stream())


def is_available():
    """Cheap checks first (torch CUDA build, a visible GPU), then the (cached) JIT build."""
    if torch.version.cuda is None:
        return False, f"this torch build ({torch.__version__}) has no CUDA support"
    if not torch.cuda.is_available():
        return False, "no CUDA device is visible"
    return native.status("cuda")


register_backend(Backend(
    name="cuda",
    forward=forward,
    backward=backward,
    device_types=("cuda",),
    is_available=is_available,
    priority=30,  # the cost model's first GPU backend (bench/costmodel.py); measured results override
    dtypes=(torch.float32, torch.bfloat16, torch.float16),
    single_pass=ChunkKernels,
    chunk_tokens=chunk_sizes.gpu_chunk_tokens,
))
