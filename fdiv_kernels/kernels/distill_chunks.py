"""Distillation chunk kernels: both LM heads' logits, one epilogue, the student's two gradient GEMMs.

The driver every backend shares (:class:`DistillChunks`; contract in
:mod:`fdiv_kernels.kernels.backends`). Per chunk of ``n`` supervised token rows:

1. ``z_t = h_t W_t^T + b_t`` (the teacher's GEMM, no gradient) into a reused float32 ``[n, V]``
   buffer, or the given teacher logits copied there;
2. ``z_s = h W^T + b`` (the student's GEMM) into a second buffer;
3. the epilogue (:meth:`DistillChunks.epilogue`, each backend's own kernel): both log-sum-exps at
   temperature ``T``, the per-row divergence ``div = sum_v p_s f(p_t / p_s)``, the hard-label NLL and,
   with row weights ``wt``, the coefficient ``dL/dz_s`` written over ``z_s``
   (:func:`fdiv_kernels.formulas.distill.chunk_epilogue` is its definition);
4. ``grad_h = coef W`` and ``grad_W = beta grad_W + coef^T h`` (``grad_b = sum coef``).

Four GEMMs (three with ``teacher_logits``), no ``[N, V]`` tensor: the two chunk buffers are the
extra memory, plus the float32 ``grad_W``. The ``"torch"`` backend's epilogue is
:func:`~fdiv_kernels.formulas.distill.chunk_epilogue` itself (:class:`TorchDistillKernels`: the
reference twin of the native ones). Compute is float32 (float64 for float64 inputs); the GEMM
operands are float32 on the CPU (bf16/fp16 weights upcast once per call) and the input dtype on
GPUs (fp32 accumulation and output), where the coefficient is rounded to the input dtype for the
two gradient GEMMs (scaled into float16's range first, :func:`coef_operand`).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import chunk_sizes
from .backends import ChunkGradBuffers, attach_distill
from .gemm_chunks import addmm_f32, mm_f32

__all__ = ["DistillChunks", "TorchDistillKernels", "coef_operand"]

#: largest |coefficient| let through unscaled into float16 (fp16 max 65504, a factor 4 of headroom)
FP16_COEF_LIMIT = 2.0 ** 14


def coef_operand(coef: torch.Tensor, dtype: torch.dtype) -> Tuple[torch.Tensor, float]:
    """``(coef in dtype, unscale)``: the float32 coefficient rounded to the GEMM operand dtype; for
    float16 first multiplied by a power of two ``s <= 1`` that brings ``max |coef|`` under
    :data:`FP16_COEF_LIMIT` (the GEMM outputs are then multiplied by ``unscale = 1 / s``: exact)."""
    if dtype == coef.dtype:
        return coef, 1.0
    if dtype != torch.float16:
        return coef.to(dtype), 1.0
    bound = float(coef.abs().amax()) if coef.numel() else 0.0
    s = 1.0
    while bound * s > FP16_COEF_LIMIT:
        s *= 0.5
    return (coef * s if s != 1.0 else coef).to(dtype), 1.0 / s


class DistillChunks(ChunkGradBuffers):
    """The driver (module docstring); a backend subclasses it with its :meth:`epilogue`.

    ``weight [V, H]``, ``bias [V] | None``: the student's head; ``teacher_weight [V, H_t] | None``,
    ``teacher_bias``: the teacher's (None when the teacher's logits are given per chunk);
    ``spec``: the :class:`~fdiv_kernels.specs.DistillSpec`. ``gemm_in_input_dtype``: the GEMM
    operands stay in the input dtype (GPUs) instead of the compute dtype.
    """

    gemm_in_input_dtype = False

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], teacher_weight: Optional[torch.Tensor],
                 teacher_bias: Optional[torch.Tensor], spec, *, need_h: bool, need_w: bool, need_b: bool) -> None:
        self.dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
        self.spec = spec
        op = weight.dtype if self.gemm_in_input_dtype else self.dtype
        self.w = weight.detach().to(op).contiguous()
        self.b = None if bias is None else bias.detach().to(self.dtype)
        self.tw = None
        if teacher_weight is not None:
            t_op = teacher_weight.dtype if self.gemm_in_input_dtype else self.dtype
            self.tw = teacher_weight.detach().to(t_op).contiguous()
        self.tb = None if teacher_bias is None else teacher_bias.detach().to(self.dtype)
        self.need_h = need_h
        v, h = weight.shape
        dev = weight.device
        self.grad_w = torch.empty((v, h), dtype=self.dtype, device=dev) if need_w else None
        self.grad_b = torch.empty(v, dtype=self.dtype, device=dev) if need_b else None
        self._bufs = torch.empty(0, dtype=self.dtype, device=dev)
        self.chunk_tokens = self.rows_per_chunk(v)

    # --- what a backend provides ---
    def rows_per_chunk(self, vocab_size: int) -> int:
        return chunk_sizes.distill_torch_tokens(vocab_size)

    def epilogue(self, zt: torch.Tensor, zs: torch.Tensor, y: torch.Tensor,
                 wt: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(div[n], nll[n])`` from the raw logits ``zt``, ``zs`` ``[n, V]`` (compute dtype, bias
        added); with ``wt`` the coefficient ``dL/dz_s`` written over ``zs``."""
        raise NotImplementedError

    # --- the driver ---
    def _buffers(self, n: int) -> Tuple[torch.Tensor, torch.Tensor]:
        v = self.w.shape[0]
        if self._bufs.numel() < 2 * n * v:
            self._bufs = torch.empty(2 * n * v, dtype=self.dtype, device=self.w.device)
        return self._bufs[:n * v].view(n, v), self._bufs[n * v:2 * n * v].view(n, v)

    def _logits(self, out: torch.Tensor, h: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor]) -> None:
        if w.dtype == self.dtype:
            h = h.to(self.dtype)
            if b is None:
                torch.mm(h, w.t(), out=out)
            else:
                torch.addmm(b, h, w.t(), out=out)
            return
        mm_f32(h.to(w.dtype), w.t(), out=out)
        if b is not None:
            out.add_(b)

    def chunk(self, h: torch.Tensor, y: torch.Tensor, wt: Optional[torch.Tensor], *,
              teacher_h: Optional[torch.Tensor] = None, teacher_z: Optional[torch.Tensor] = None):
        """``(div[n], nll[n], grad_h[n, H] | None)`` of one chunk (module docstring); ``wt=None``:
        values only (no coefficient, no gradient GEMMs)."""
        zt, zs = self._buffers(h.shape[0])
        if teacher_z is not None:
            zt.copy_(teacher_z)
        else:
            self._logits(zt, teacher_h, self.tw, self.tb)
        self._logits(zs, h, self.w, self.b)
        div, nll = self.epilogue(zt, zs, y, None if wt is None else wt.to(self.dtype).contiguous())
        if wt is None:
            return div, nll, None
        coef, unscale = coef_operand(zs, self.w.dtype)
        beta = self._accumulate_beta(1.0)
        if self.grad_w is not None:
            if coef.dtype == self.dtype:
                self.grad_w.addmm_(coef.t(), h.to(self.dtype), beta=beta, alpha=unscale)
            else:
                addmm_f32(self.grad_w, coef.t(), h.to(coef.dtype), beta=beta, alpha=unscale)
        if self.grad_b is not None:
            col = coef.sum(0, dtype=self.dtype)
            if beta:
                self.grad_b.add_(col, alpha=unscale)
            else:
                torch.mul(col, unscale, out=self.grad_b)
        if not self.need_h:
            return div, nll, None
        gh = mm_f32(coef, self.w) if coef.dtype != self.dtype else coef @ self.w
        return div, nll, (gh if unscale == 1.0 else gh.mul_(unscale))


class TorchDistillKernels(DistillChunks):
    """The ``"torch"`` backend's distillation kernels: the epilogue in torch ops
    (:meth:`~fdiv_kernels.specs.DistillSpec.epilogue`), any device, any float dtype."""

    def epilogue(self, zt, zs, y, wt):
        div, nll, coef = self.spec.epilogue(zt, zs, y, wt)
        if coef is not None:
            zs.copy_(coef)
        return div, nll


attach_distill("torch", TorchDistillKernels)
