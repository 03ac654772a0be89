"""The ``"torch"`` backend: the reference implementation of ``token_stats``, chunked over tokens.

Chunk rule (:mod:`.chunk_sizes`): the two-pass ``forward``/``backward`` process
``torch_rows(V) = max(1, 2**22 // V)`` rows at a time (16 MiB of fp32 logits); the one-pass
:class:`ChunkKernels` (``fk.loss``) ``torch_chunk_tokens``: 64 MiB of chunk buffers, reused by every
chunk of a call. Peak extra memory is therefore O(chunk + V*H) (the fp32 grad_weight accumulator
and, for bf16/fp16 inputs on devices without 16-bit x 16-bit -> float32 GEMMs, an fp32 copy of the
weight), never O(N*V).

Math (per row n, with z = cap(h W^T + b) / T, cap(x) = c*tanh(x/c) when a soft-cap c is set):

    lse[n]  = logsumexp_v z[n, v]
    logp[n] = z[n, y[n]] - lse[n]
    ent[n]  = lse[n] - sum_v p[n, v] z[n, v],  p = softmax(z)
    dL/dz   = g * onehot(y) + (k - g) * p - e * p * (z - (lse - ent))

with g = dL/dlogp, k = dL/dlse, e = dL/dent; a logit of -inf (masked token) has p = 0 and adds
exact zeros (``p * z`` and ``p * (z - mean)`` are taken as 0 there, not ``0 * -inf``). The
temperature is applied as a multiplication by ``1 / T`` (rounded), as in the native backends. Computation is in float32 (float64 for float64
inputs); low-precision inputs are upcast chunk by chunk.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from . import chunk_sizes, gemm_chunks
from .backends import Backend, ChunkGradBuffers, cpu_has_bf16_units, register_backend


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _logits(h: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], head) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Logits of one chunk and, with a soft-cap, tanh(raw / cap) (needed by the backward)."""
    z = h @ w.T
    if b is not None:
        z = z + b
    return transform(z, head)


def transform(z: torch.Tensor, head) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(cap(raw) / T, tanh(raw / cap) or None)`` of raw logits (with the bias added), for the
    ``head``'s soft-cap and temperature."""
    t = None
    if head.softcap is not None:
        t = torch.tanh(z / head.softcap)
        z = t * head.softcap
    if head.temperature != 1.0:
        z = z * (1.0 / head.temperature)  # times the rounded 1/T, as every native backend: the same z bits
    return z, t


def forward(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], labels: torch.Tensor, *,
            head, return_entropy: bool = False):
    cdt = compute_dtype(hidden.dtype)
    n = hidden.shape[0]
    w = weight.to(cdt)
    b = None if bias is None else bias.to(cdt)
    logp = torch.empty(n, dtype=cdt, device=hidden.device)
    lse = torch.empty_like(logp)
    ent = torch.empty_like(logp) if return_entropy else None
    step = chunk_sizes.torch_rows(weight.shape[0])
    for s in range(0, n, step):
        e = min(n, s + step)
        z, _ = _logits(hidden[s:e].to(cdt), w, b, head)
        logp[s:e], lse[s:e], ent_c = _stats(z, labels[s:e], return_entropy)
        if ent is not None:
            ent[s:e] = ent_c
    return logp, lse, ent


def _coef(z: torch.Tensor, t: Optional[torch.Tensor], labels: torch.Tensor, lse: torch.Tensor,
          entropy: Optional[torch.Tensor], g: torch.Tensor, k: torch.Tensor, e: Optional[torch.Tensor],
          temperature: float) -> torch.Tensor:
    """``dL/draw [n, V]`` of one chunk from its logits ``z`` (and ``t = tanh(raw / cap)``)."""
    cdt = z.dtype
    lse_c = lse[:, None].to(cdt)
    p = torch.exp(z - lse_c)
    g = g[:, None].to(cdt)
    coef = (k[:, None].to(cdt) - g) * p
    if e is not None:
        mean_z = lse_c - entropy[:, None].to(cdt)
        # a masked logit (z = -inf, p = 0) adds 0, not 0 * -inf
        coef = coef - e[:, None].to(cdt) * p * torch.where(p > 0, z - mean_z, torch.zeros((), dtype=cdt, device=z.device))
    coef.scatter_add_(1, labels[:, None], g)
    if temperature != 1.0:
        coef = coef * (1.0 / temperature)
    if t is not None:
        coef = coef * (1 - t * t)
    return coef


def _stats(z: torch.Tensor, labels: torch.Tensor, return_entropy: bool):
    lse = torch.logsumexp(z, dim=-1)
    logp = z.gather(1, labels[:, None]).squeeze(1) - lse
    return logp, lse, (entropy(z) if return_entropy else None)


def entropy(z: torch.Tensor) -> torch.Tensor:
    """Entropy of ``softmax(z)`` over the last dim as the native backends compute it:
    ``log S - A / S`` with ``S = sum e^d``, ``A = sum e^d d``, ``d = z - max z`` (exact shifts), not
    ``lse - sum p z``, whose two terms of size ``|z|`` cancel to an absolute error of ``eps |z|``.
    A masked logit (``z = -inf``) adds exact zeros; differentiable (the shift is a constant)."""
    m = z.detach().amax(dim=-1, keepdim=True)
    d = z - torch.where(torch.isfinite(m), m, torch.zeros((), dtype=z.dtype, device=z.device))
    e = torch.exp(d)
    big_s = e.sum(-1)
    big_a = (e * torch.where(e > 0, d, torch.zeros((), dtype=z.dtype, device=z.device))).sum(-1)
    return torch.log(big_s) - big_a / big_s


def backward(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], labels: torch.Tensor,
             lse: torch.Tensor, entropy: Optional[torch.Tensor], grad_logp: torch.Tensor, grad_lse: torch.Tensor,
             grad_entropy: Optional[torch.Tensor], *, head):
    cdt = compute_dtype(hidden.dtype)
    n = hidden.shape[0]
    w = weight.to(cdt)
    b = None if bias is None else bias.to(cdt)
    grad_h = torch.empty(hidden.shape, dtype=cdt, device=hidden.device)
    grad_w = torch.zeros(weight.shape, dtype=cdt, device=weight.device)
    grad_b = None if bias is None else torch.zeros(bias.shape, dtype=cdt, device=bias.device)
    step = chunk_sizes.torch_rows(weight.shape[0])
    for s in range(0, n, step):
        e = min(n, s + step)
        h = hidden[s:e].to(cdt)
        z, t = _logits(h, w, b, head)
        coef = _coef(z, t, labels[s:e], lse[s:e], None if entropy is None else entropy[s:e], grad_logp[s:e],
                     grad_lse[s:e], None if grad_entropy is None else grad_entropy[s:e], head.temperature)
        grad_h[s:e] = coef @ w
        grad_w.addmm_(coef.T, h)
        if grad_b is not None:
            grad_b += coef.sum(0)
    return grad_h, grad_w, grad_b


class ChunkKernels(ChunkGradBuffers):
    """One-pass chunk kernels of the torch backend (the reference twin of the native ones; see
    :mod:`fdiv_kernels.kernels.backends`), written for speed in plain torch:

    * one ``[rows, V]`` compute-dtype buffer per call, reused by every chunk: the logits GEMM writes
      it (``out=``), ``log_softmax`` overwrites it in place with ``z - lse`` (``lse`` read off at the
      row's largest logit), kept between ``stats`` and ``grads``, which turns it into ``p`` and then
      ``dL/draw`` in place (with a soft-cap the transformed logits are kept besides, for the
      derivative);
    * 16-bit inputs: the logits GEMM in float32 (``out_dtype=float32`` where the device has it, else
      on a float32 copy of the weight if it fits the chunk budget, else on the weight converted block
      by block); where 16-bit GEMMs are fast (:func:`_lowp_gemms_fast`) the
      coefficient is rounded to the input dtype for the two gradient GEMMs (as Liger and Cut
      Cross-Entropy do): ``grad_h`` one 16-bit GEMM per chunk, ``grad_W`` accumulated in float32
      (``out_dtype`` where the device has it, else each chunk's 16-bit product added to the float32
      accumulator); elsewhere all three GEMMs run in float32.
    """

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], head, *, return_entropy: bool,
                 need_h: bool, need_w: bool, need_b: bool) -> None:
        self.dtype = compute_dtype(weight.dtype)
        self.vocab, self.device = weight.shape[0], weight.device
        dev = self.device
        lowp = weight.dtype not in (torch.float32, torch.float64)
        self.out_dtype = lowp and _out_dtype_gemms(dev)
        self.lowp_grads = lowp and _lowp_gemms_fast(weight.dtype, dev)
        self.w16 = weight.detach() if lowp else None
        # the compute-dtype weight: the weight itself; for 16-bit inputs a copy when a float32 grad_h
        # GEMM needs it, or for the logits GEMM (without out_dtype) when the copy is no larger than
        # the chunk budget; else the logits GEMM converts the weight block by block once per chunk
        # (_mm_converted): measured at 2048 x 256 x 32000 bf16 the copy is 11% faster (6 chunks
        # convert 6 times), at 1024 x 1024 x 32000 the blocks 6% (3 chunks; a 125 MiB copy saved)
        small = weight.numel() * torch.finfo(self.dtype).bits // 8 <= chunk_sizes.TORCH_SINGLE_PASS_BYTES
        need_copy = (need_h and not self.lowp_grads) or (not self.out_dtype and small)
        self.w = weight.detach() if not lowp else (weight.detach().to(self.dtype) if need_copy else None)
        self.b = None if bias is None else bias.to(self.dtype)
        self.head, self.return_entropy = head, return_entropy
        self.need_h = need_h
        self.grad_w = torch.empty(weight.shape, dtype=self.dtype, device=dev) if need_w else None
        self.grad_b = torch.empty(bias.shape, dtype=self.dtype, device=dev) if need_b else None
        self._bufs = {}
        self._kept = None

    def _buffer(self, name: str, shape, dtype: torch.dtype) -> torch.Tensor:
        """A buffer of this call, reused by the later (never larger) chunks."""
        numel = shape[0] * shape[1]
        b = self._bufs.get(name)
        if b is None or b.numel() < numel:
            b = self._bufs[name] = torch.empty(numel, dtype=dtype, device=self.device)
        return b[:numel].view(shape)

    def stats(self, h: torch.Tensor, y: torch.Tensor):
        z = self._buffer("z", (h.shape[0], self.vocab), self.dtype)
        if self.out_dtype:
            gemm_chunks.mm_f32(h, self.w16.T, out=z)
        elif self.w is not None:
            torch.mm(h.to(self.dtype), self.w.T, out=z)
        else:
            _mm_converted(h.to(self.dtype), self.w16, z)
        if self.b is not None:
            z.add_(self.b)
        zt = None
        if self.head.softcap is not None:  # the transformed logits are kept for the derivative
            zt, _ = transform(z, self.head)
            z.copy_(zt)
        elif self.head.temperature != 1.0:
            z.mul_(1.0 / self.head.temperature)  # times the rounded 1/T, as transform()
        ent = entropy(z) if self.return_entropy else None
        z_m, m = torch.max(z, 1, keepdim=True)
        _log_softmax_(z)  # z - lse, in place
        logp = z.gather(1, y[:, None]).squeeze(1)
        # lse = z - (z - lse) at the row's largest logit (finite whenever lse is, unlike the label's
        # logit, which a -inf bias may mask): max z + log sum exp(z - max z)
        lse = (z_m - z.gather(1, m)).squeeze(1)
        if self.head.vocab is not None:  # a shard's row may be all -inf: lse = logp = -inf, not NaN
            live = torch.isfinite(z_m.squeeze(1))
            lse = torch.where(live, lse, z_m.squeeze(1))
            logp = torch.where(live, logp, z_m.squeeze(1))
        self._kept = (z, zt, lse)
        self._argmax = m.squeeze(1)
        return logp, lse, ent

    def argmax(self) -> torch.Tensor:
        """``[n]`` int64: each row's largest logit's index, of the last :meth:`stats`' chunk (its
        logits are kept: no GEMM)."""
        return self._argmax

    def grads(self, h, y, lse, ent, g, k, e, *, alpha: float = 1.0, beta: float = 1.0):
        ls, zt, lse_kept = self._kept
        self._kept = None
        if self.head.vocab is not None:
            # kept: z - lse of this shard; wanted (the kernel contract): z - lse with the lse given, the
            # whole head's (autograd.vocab_parallel). A row all -inf on this shard: p = 0 (NaN -> -inf).
            ls.add_((lse_kept - lse).to(ls.dtype)[:, None]).nan_to_num_(nan=-math.inf, posinf=-math.inf)
        coef = _coef_in_place(ls, zt, y, ent, g, k, e, self.head.softcap, self.head.temperature)
        beta = self._accumulate_beta(beta)
        if self.grad_b is not None:
            _accumulate(self.grad_b, coef.sum(0), alpha, beta)
        if not self.lowp_grads:
            if self.grad_w is not None:
                self.grad_w.addmm_(coef.T, h.to(self.dtype), beta=beta, alpha=alpha)
            return coef @ self.w if self.need_h else None
        c16 = self._buffer("coef16", coef.shape, self.w16.dtype).copy_(coef)  # rounded, as Liger and CCE
        if self.grad_w is not None:
            if self.out_dtype:  # (with the cuda backend's fallback where this torch lacks it)
                gemm_chunks.addmm_f32(self.grad_w, c16.T, h, beta=beta, alpha=alpha)
            else:  # 16-bit GEMMs (float32 accumulation inside), their results added in float32
                _addmm_16(self.grad_w, c16.T, h, alpha, beta)
        if not self.need_h:
            return None
        return gemm_chunks.mm_f32(c16, self.w16) if self.out_dtype else c16 @ self.w16


#: elements of a float32 block of the 16-bit paths' conversions (8 MiB)
_BLOCK_ELEMENTS = 2 ** 21


def _mm_converted(h: torch.Tensor, w16: torch.Tensor, z: torch.Tensor) -> None:
    """``z = h w16^T`` with ``w16`` converted to ``h``'s dtype by blocks of 8 MiB of rows (each block's
    GEMM writes its columns of ``z``): no weight-sized copy, at the price of converting the weight
    once per chunk instead of once per call."""
    rows = max(1, _BLOCK_ELEMENTS // max(1, w16.shape[1]))
    tmp = torch.empty((min(rows, w16.shape[0]), w16.shape[1]), dtype=h.dtype, device=h.device)
    for v0 in range(0, w16.shape[0], rows):
        v1 = min(w16.shape[0], v0 + rows)
        torch.mm(h, tmp[:v1 - v0].copy_(w16[v0:v1]).T, out=z[:, v0:v1])


def _log_softmax_(z: torch.Tensor) -> None:
    """``z = log_softmax(z, 1)`` in place: by the CPU kernel writing over its input (tested here:
    each row is reduced before it is written, element by element); elsewhere (CUDA, MPS, XPU, where
    that is not verified) through a temporary."""
    if z.device.type == "cpu":
        torch.log_softmax(z, 1, out=z)
    else:
        z.copy_(torch.log_softmax(z, 1))


def _accumulate(acc: torch.Tensor, part: torch.Tensor, alpha: float, beta: float) -> None:
    """``acc = beta acc + alpha part`` in place (``beta = 0``: ``acc`` is not read)."""
    if beta:
        acc.mul_(beta).add_(part, alpha=alpha)
    else:
        torch.mul(part, alpha, out=acc)


def _addmm_16(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float, beta: float) -> None:
    """``acc = beta acc + alpha a @ b`` on the float32 ``acc`` with 16-bit GEMMs (float32 accumulation
    inside, a 16-bit result), by blocks of 8 MiB of ``acc``'s rows, each result converted to float32
    and added: no ``acc``-sized temporary, and no add with a 16-bit operand (torch's mixed-dtype
    path, 4x slower on this CPU than a conversion followed by a float32 add)."""
    rows = max(1, _BLOCK_ELEMENTS // max(1, acc.shape[1]))
    part = torch.empty((min(rows, acc.shape[0]), acc.shape[1]), dtype=a.dtype, device=acc.device)
    tmp = torch.empty(part.shape, dtype=acc.dtype, device=acc.device)
    for r0 in range(0, acc.shape[0], rows):
        r1 = min(acc.shape[0], r0 + rows)
        p = torch.mm(a[r0:r1], b, out=part[:r1 - r0])
        _accumulate(acc[r0:r1], tmp[:r1 - r0].copy_(p), alpha, beta)


def _out_dtype_gemms(device: torch.device) -> bool:
    """Whether this device runs 16-bit x 16-bit GEMMs with a float32 output (``mm(..., out_dtype=)``,
    :func:`.gemm_chunks.mm_f32`): CUDA does (unless this torch was found to lack it); torch's CPU
    build does not (``tests/test_torch_backend.py``)."""
    return device.type == "cuda" and gemm_chunks.mixed_gemm_supported()


def _lowp_gemms_fast(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether 16-bit GEMMs are faster than float32 ones here: on accelerators, and for bf16 on CPUs
    with bf16 dot-product units (AVX512-BF16 or AMX, through oneDNN); a CPU without them runs bf16
    GEMMs no faster than float32 ones (or far slower, without oneDNN), and float16 ones slower."""
    if device.type != "cpu":
        return True
    if dtype != torch.bfloat16 or not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
        return False
    return cpu_has_bf16_units()


def _coef_in_place(ls: torch.Tensor, zt: Optional[torch.Tensor], labels: torch.Tensor, entropy: Optional[torch.Tensor],
                   g: torch.Tensor, k: torch.Tensor, e: Optional[torch.Tensor], softcap: Optional[float],
                   temperature: float) -> torch.Tensor:
    """``dL/draw`` over ``ls = z - lse`` in place (``zt``: the transformed logits, with a soft-cap):
    the math of :func:`_coef`, with ``p = exp(ls)`` and ``z - mean_z = ls + entropy``."""
    cdt = ls.dtype
    col = lambda t: t.to(cdt)[:, None]  # noqa: E731
    if e is None:
        coef = ls.exp_().mul_(col(k - g))
    else:
        p = torch.exp(ls)
        centered = torch.where(p > 0, ls + col(entropy), torch.zeros((), dtype=cdt, device=ls.device))
        coef = torch.mul(p, col(k - g), out=ls).sub_(p.mul_(centered).mul_(col(e)))  # 0, not 0 * -inf, at p = 0
    coef.scatter_add_(1, labels[:, None], col(g))
    if zt is not None:  # the soft-cap derivative 1 - tanh^2, tanh = z T / c
        coef.mul_(zt.mul_(temperature / softcap).square_().neg_().add_(1.0))
    if temperature != 1.0:
        coef.mul_(1.0 / temperature)
    return coef


register_backend(Backend(
    name="torch",
    forward=forward,
    backward=backward,
    device_types=("cpu", "cuda"),
    is_available=lambda: (True, ""),
    priority=0,
    single_pass=ChunkKernels,
    chunk_tokens=chunk_sizes.torch_chunk_tokens,
))
