"""The ``"triton"`` backend's distillation kernels: the shared GEMM driver of :mod:`.distill_chunks`
(cuBLAS GEMMs in the input dtype with float32 outputs on GPUs) and the Triton epilogue of
:mod:`.distill_triton_kernels` (imported on first use, so ``import fdiv_kernels`` never compiles
anything and works without triton; CPU tensors under ``TRITON_INTERPRET=1``, for tests).

The epilogue writes the float32 coefficient over the student's logits; for 16-bit inputs it is
rounded to the input dtype for the two gradient GEMMs (float16 scaled into range first,
:func:`.distill_chunks.coef_operand`).
"""

from __future__ import annotations

import importlib
import math

import torch

from ..formulas.distill import FORM_IDS
from . import chunk_sizes
from .backends import attach_distill
from .distill_chunks import DistillChunks
from .triton_backend import _on_device

__all__ = ["TritonDistillKernels"]


def kernels():
    """The Triton kernel module (imported, and its kernels compiled, on first use)."""
    return importlib.import_module("fdiv_kernels.kernels.distill_triton_kernels")


class TritonDistillKernels(DistillChunks):
    """Distillation chunk kernels of the ``triton`` backend (contract in :mod:`.backends`)."""

    gemm_in_input_dtype = True

    def __init__(self, weight, bias, teacher_weight, teacher_bias, spec, *, need_h, need_w, need_b) -> None:
        super().__init__(weight, bias, teacher_weight, teacher_bias, spec, need_h=need_h, need_w=need_w,
                         need_b=need_b)
        self.kern = kernels()
        form, c = spec.form, spec.param
        f0, f_inf, a0 = form.f0(c), form.f_inf(c), form.a0(c)
        alpha = form.name == "alpha"
        js = form.name == "js"
        swap = 1.0 if alpha and c < 0.5 else 0.0
        self._scalars = dict(
            inv_t=spec.inv_temperature, div_scale=spec.kappa * spec.inv_temperature,
            hard_weight=spec.hard_label_weight, c=float(c), log_c=math.log(c) if js else 0.0,
            log_1mc=math.log1p(-c) if js else 0.0, ac=(1.0 - c if swap else float(c)), swap=swap,
            f0=f0 if math.isfinite(f0) else 0.0, f_inf=f_inf if math.isfinite(f_inf) else 0.0,
            a0=a0 if math.isfinite(a0) else 0.0)
        self._flags = dict(FORM=FORM_IDS[form.name], F0_INF=not math.isfinite(f0), FINF_INF=not math.isfinite(f_inf),
                           A0_INF=not math.isfinite(a0), HARD=spec.hard_label_weight > 0,
                           RAW=spec.hard_label_weight > 0 and spec.inv_temperature != 1.0)

    def rows_per_chunk(self, vocab_size: int) -> int:
        return chunk_sizes.distill_gpu_tokens(vocab_size)

    def epilogue(self, zt, zs, y, wt):
        n, v = zs.shape
        div = torch.empty(n, dtype=torch.float32, device=zs.device)
        nll = torch.empty_like(div)
        if n == 0:
            return div, nll
        with _on_device(zs.device):
            self.kern.distill_epilogue_kernel[(n,)](
                zt, zs, y, div if wt is None else wt, div, nll, v, **self._scalars, **self._flags,
                WITH_COEF=wt is not None, BLOCK=self.kern.DISTILL_BLOCK, num_warps=4)
        return div, nll


attach_distill("triton", TritonDistillKernels)
