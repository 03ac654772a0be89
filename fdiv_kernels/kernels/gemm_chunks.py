"""One-pass chunk kernels built from torch (cuBLAS) GEMMs and two epilogue kernels.

The GPU backends (``cuda``: CUDA C epilogues; ``triton``: Triton epilogues) share this driver
(the contract is in :mod:`fdiv_kernels.kernels.backends`). Per chunk of ``n`` token rows:

1. ``z = h W^T`` into a reused float32 buffer (bf16/fp16 operands, fp32 accumulation and output);
2. the forward epilogue: one read of ``z`` (bias, soft-cap, temperature, online log-sum-exp,
   label, entropy);
3. the coefficient epilogue: one read of ``z``, one write of ``dL/draw`` in the input dtype
   (over the same rows when the backend writes in place, else into a second buffer);
4. ``grad_h = coef W`` and ``grad_W = beta grad_W + alpha coef^T h`` (fp32 accumulation and
   output; ``beta = 0`` on the first chunk, so ``grad_W`` needs no zero-fill pass).

Passes over a chunk's logits besides the GEMMs: two float32 reads and one 16-bit write. A
float16 coefficient is scaled into fp16's range first (:mod:`.lowp`).
"""

from __future__ import annotations

import logging
from typing import Optional

import torch

from .. import knobs
from . import lowp
from .backends import ChunkGradBuffers

logger = logging.getLogger("fdiv_kernels")

class _TorchSupport:
    """Facts about the installed torch found at run time (kept for the process, as :mod:`.native`
    keeps a failed build): ``mixed_gemm_failed`` once a 16-bit GEMM with a float32 output was
    rejected."""

    mixed_gemm_failed = False


def mixed_gemm_supported() -> bool:
    """Whether 16-bit x 16-bit GEMMs with a float32 output (``mm``/``addmm`` with ``out_dtype``, in
    Python and in the cuda extension) are used: the knob ``mixed_gemm`` (``FDIV_CUDA_MIXED_GEMM``)
    and no earlier call found this torch without them."""
    return bool(knobs.get("mixed_gemm")) and not _TorchSupport.mixed_gemm_failed


def mixed_gemm_unsupported(exc: BaseException, dtype: torch.dtype) -> None:
    """Record that this torch rejected a 16-bit GEMM with a float32 output; warn once."""
    if not _TorchSupport.mixed_gemm_failed:
        _TorchSupport.mixed_gemm_failed = True
        logger.warning("fdiv_kernels: GEMMs with a float32 output for %s operands are not supported here (%s); "
                       "using float32-output fallbacks", dtype, str(exc).splitlines()[0][:200])


def mm_f32(a: torch.Tensor, b: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``a @ b`` with a float32 result: bf16/fp16 operands, fp32 accumulation and output (cuBLAS)."""
    if a.dtype == torch.float32:
        return torch.mm(a, b, out=out)
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32, out=out)
    return torch.mm(a.float(), b.float(), out=out)  # CPU twins (tests, interpreter): the same math


_BLOCK_ROWS = 8192


def addmm_f32(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, beta: float, alpha: float) -> None:
    """``c = beta c + alpha a @ b`` in place on the float32 ``c`` (``beta = 0``: ``c`` is not read).

    16-bit operands on CUDA: one cuBLAS call with a float32 output (``addmm(..., out_dtype=)``);
    where this torch rejects that, float32-output GEMMs over blocks of 8192 rows of ``c``
    (a bounded temporary), once warned."""
    if a.dtype == torch.float32:
        c.addmm_(a, b, beta=beta, alpha=alpha)
        return
    if not a.is_cuda:
        c.addmm_(a.float(), b.float(), beta=beta, alpha=alpha)
        return
    if mixed_gemm_supported():
        try:
            torch.addmm(c, a, b, beta=beta, alpha=alpha, out_dtype=torch.float32, out=c)
            return
        except (TypeError, NotImplementedError, RuntimeError) as exc:
            if "out of memory" in str(exc).lower():
                raise
            mixed_gemm_unsupported(exc, a.dtype)
    blocked_addmm_f32(c, a, b, beta=beta, alpha=alpha)


def blocked_addmm_f32(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, beta: float, alpha: float) -> None:
    """:func:`addmm_f32` as float32-output GEMMs over blocks of ``_BLOCK_ROWS`` rows of ``c``."""
    for r0 in range(0, c.shape[0], _BLOCK_ROWS):
        part = mm_f32(a[r0:r0 + _BLOCK_ROWS], b)
        blk = c[r0:r0 + _BLOCK_ROWS]
        if beta:
            blk.mul_(beta).add_(part, alpha=alpha)
        else:
            torch.mul(part, alpha, out=blk)


class GemmChunkKernels(ChunkGradBuffers):
    """The driver; subclasses provide :meth:`forward_epilogue` and :meth:`coef_epilogue` and say
    whether the coefficient is written over the logits' rows (``coef_in_place``)."""

    dtype = torch.float32
    coef_in_place = True

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], head, *, return_entropy: bool,
                 need_h: bool, need_w: bool, need_b: bool) -> None:
        self.w = weight.detach()
        self.b = None if bias is None else bias.detach().to(torch.float32)
        self.softcap, self.temperature = head.softcap, float(head.temperature)
        self.return_entropy, self.need_h = return_entropy, need_h
        v, h = weight.shape
        dev = weight.device
        self.grad_w = torch.empty((v, h), dtype=torch.float32, device=dev) if need_w else None
        self.grad_b = torch.empty(v, dtype=torch.float32, device=dev) if need_b else None
        self.buf = torch.empty(0, dtype=torch.float32, device=dev)
        self.coef_buf = torch.empty(0, dtype=weight.dtype, device=dev)
        self._n = 0

    # --- what a backend provides ---
    def forward_epilogue(self, z: torch.Tensor, y: torch.Tensor):
        """``(logp[n], lse[n], entropy[n] | None)`` from the raw logits ``z [n, V]`` (float32)."""
        raise NotImplementedError

    def coef_epilogue(self, z, coef, y, lse, ent, g, k, e) -> None:
        """Write ``dL/draw`` of the chunk into ``coef [n, V]`` (the input dtype)."""
        raise NotImplementedError

    # --- the driver ---
    def _views(self, n: int):
        """The chunk's float32 ``z [n, V]`` and its coefficient matrix: for 16-bit inputs written in
        place the first half of each float32 row (row stride 2V), else a second buffer."""
        v = self.w.shape[0]
        flat = self.buf[:n * v]
        z = flat.view(n, v)
        if self.w.dtype == torch.float32:
            return z, z
        if self.coef_in_place:
            return z, flat.view(self.w.dtype).view(n, 2 * v)[:, :v]
        if self.coef_buf.numel() < n * v:
            self.coef_buf = torch.empty(n * v, dtype=self.w.dtype, device=self.w.device)
        return z, self.coef_buf[:n * v].view(n, v)

    def stats(self, h: torch.Tensor, y: torch.Tensor):
        n, v = h.shape[0], self.w.shape[0]
        if self.buf.numel() < n * v:
            self.buf = torch.empty(n * v, dtype=torch.float32, device=self.w.device)
        z, _ = self._views(n)
        mm_f32(h, self.w.t(), out=z)
        self._n = n
        logp, lse, ent = self.forward_epilogue(z, y)
        return logp, lse, (ent if self.return_entropy else None)

    def argmax(self) -> torch.Tensor:
        """``[n]`` int64: each row's largest logit's index, read off the float32 logits the last
        :meth:`stats` kept (before :meth:`grads` writes the coefficient over them): one read of the
        chunk's logits (and an add of the bias), no GEMM. The soft-cap and temperature are monotone,
        so the raw logits' argmax is the transformed ones'."""
        z, _ = self._views(self._n)
        return (z if self.b is None else z + self.b).argmax(1)

    def grads(self, h, y, lse, ent, g, k, e, *, alpha: float = 1.0, beta: float = 1.0):
        z, coef = self._views(self._n)
        # float16: the coefficient is scaled into fp16's range by a power of two s and the fp32
        # GEMM outputs by 1/s (exact; :mod:`.lowp`); one host read per chunk, fp16 inputs only
        unscale = 1.0
        scale = lowp.fp16_coef_scale(self.w.dtype, g, k, e, ent, self.temperature)
        if scale is not None:
            s = float(scale)
            if s != 1.0:
                g, k, e = g * s, k * s, (None if e is None else e * s)
                unscale = 1.0 / s
        self.coef_epilogue(z, coef, y, lse, ent if e is not None else None, g, k, e)
        beta = self._accumulate_beta(beta)
        alpha = alpha * unscale
        if self.grad_w is not None:
            addmm_f32(self.grad_w, coef.t(), h, beta=beta, alpha=alpha)
        if self.grad_b is not None:
            col = coef.sum(0, dtype=torch.float32)
            if beta:
                self.grad_b.mul_(beta).add_(col, alpha=alpha)
            else:
                torch.mul(col, alpha, out=self.grad_b)
        if not self.need_h:
            return None
        gh = mm_f32(coef, self.w)
        return gh if unscale == 1.0 else gh.mul_(unscale)

