"""The ``"cuda"`` backend's distillation kernels: the shared GEMM driver of :mod:`.distill_chunks`
(cuBLAS GEMMs in the input dtype with float32 outputs) and the CUDA epilogue of
``csrc/cuda/distill_epilogue.cu`` (one block per row, three passes; bound in
``csrc/cuda/distill_bindings_cuda.cpp``). Compile-checked with nvcc without a GPU
(tests/test_cuda_compile.py); its runtime twin on CPU is the cpu backend's epilogue, which runs the
same passes (csrc/cpu/distill_rows_cpu.cpp), and the Triton one under the interpreter.
"""

from __future__ import annotations

import math

import torch

from ..formulas.distill import FORM_IDS
from . import chunk_sizes, native
from .backends import attach_distill
from .distill_chunks import DistillChunks

__all__ = ["CudaDistillKernels"]


class CudaDistillKernels(DistillChunks):
    """Distillation chunk kernels of the ``cuda`` backend (contract in :mod:`.backends`)."""

    gemm_in_input_dtype = True

    def __init__(self, weight, bias, teacher_weight, teacher_bias, spec, *, need_h, need_w, need_b) -> None:
        super().__init__(weight, bias, teacher_weight, teacher_bias, spec, need_h=need_h, need_w=need_w,
                         need_b=need_b)
        self.mod = native.load("cuda")
        form, c = spec.form, spec.param

        def lim(x: float) -> float:
            return x if math.isfinite(x) else math.inf

        self._args = (FORM_IDS[form.name], float(c), lim(form.f0(c)), lim(form.f_inf(c)), lim(form.a0(c)),
                      spec.inv_temperature, spec.kappa, spec.hard_label_weight)

    def rows_per_chunk(self, vocab_size: int) -> int:
        return chunk_sizes.distill_gpu_tokens(vocab_size)

    def epilogue(self, zt, zs, y, wt):
        stream = torch.cuda.current_stream(zs.device).cuda_stream
        return self.mod.distill_epilogue(zt, zs, y, wt, *self._args, stream)


attach_distill("cuda", CudaDistillKernels)
