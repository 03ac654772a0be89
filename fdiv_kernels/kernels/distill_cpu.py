"""The ``"cpu"`` backend's distillation kernels: ATen GEMMs (the shared driver of
:mod:`.distill_chunks`) and the C++ epilogue of ``csrc/cpu/distill_cpu.cpp`` (rows in parallel,
vectorised row loops in ``csrc/cpu/distill_rows_cpu.cpp``).

Per chunk of ``chunk_sizes.distill_cpu_tokens(V)`` rows (512 at V = 32000): the teacher's and the
student's float32 logits in the backend's reused workspace (two ``[rows, V]`` halves of
:func:`fdiv_kernels.kernels.cpu_backend.workspace`: 128 MiB, no page faults after the first call),
one epilogue pass per row that reads both rows three times and writes the coefficient over the
student's, then the two gradient GEMMs. bf16/fp16 weights are upcast once per call, hidden rows
once per chunk; float64 goes to the torch reference.
"""

from __future__ import annotations

import math


from . import chunk_sizes, cpu_backend, native
from ..formulas.distill import FORM_IDS
from .backends import attach_distill
from .distill_chunks import DistillChunks

__all__ = ["CpuDistillKernels"]


def _finite_or_inf(x: float) -> float:
    return x if math.isfinite(x) else math.inf


class CpuDistillKernels(DistillChunks):
    """Distillation chunk kernels of the ``cpu`` backend (contract in :mod:`.backends`)."""

    def __init__(self, weight, bias, teacher_weight, teacher_bias, spec, *, need_h, need_w, need_b) -> None:
        super().__init__(weight, bias, teacher_weight, teacher_bias, spec, need_h=need_h, need_w=need_w,
                         need_b=need_b)
        self.mod = native.load("cpu")
        form, c = spec.form, spec.param
        self._args = (FORM_IDS[form.name], c, _finite_or_inf(form.f0(c)), _finite_or_inf(form.f_inf(c)),
                      _finite_or_inf(form.a0(c)), spec.inv_temperature, spec.kappa, spec.hard_label_weight)

    def rows_per_chunk(self, vocab_size: int) -> int:
        return chunk_sizes.distill_cpu_tokens(vocab_size)

    def _buffers(self, n: int):
        v = self.w.shape[0]
        buf = cpu_backend.workspace(2 * n * v)
        return buf[:n * v].view(n, v), buf[n * v:2 * n * v].view(n, v)

    def epilogue(self, zt, zs, y, wt):
        return self.mod.distill_epilogue(zt, zs, y, wt, *self._args)


attach_distill("cpu", CpuDistillKernels)
