"""The ``"cpu"`` backend: the C++ extension (``csrc/cpu``), ATen GEMMs + a fused C++ epilogue.

Same contract as :mod:`fdiv_kernels.kernels.torch_chunked` (valid rows only, float32 outputs).
The ``[N, V]`` logits are visited in tiles of ``tile_shape(N, V)`` = (token rows, vocabulary
columns) with ``rows * cols <= 2**22`` (:mod:`.chunk_sizes`): one GEMM per tile into a reused float32 buffer
(``hidden @ weight.T + bias``, MKL/OpenBLAS through ATen) and a fused epilogue per row segment,
parallelised over rows with ``at::parallel_for``:

* forward: soft-cap/temperature, max, ``sum exp``, label pick and entropy while the segment sits
  in cache, merged across vocabulary tiles with an online log-sum-exp;
* backward: the tile is recomputed and overwritten in place by
  ``dL/draw = dz/draw * (g onehot(y) + (k - g) p - e p (z - (lse - ent)))``, then both GEMMs
  (``grad_hidden[block] += coef @ W[tile]``, ``grad_weight[tile] += coef^T h[block]``) use it.

Square-ish tiles (~2048 x 2048) instead of full-vocabulary row chunks cut the memory traffic: the
``[V, H]`` weight and ``grad_weight`` are streamed once per token block instead of once per ~128
rows. Peak extra memory: one tile buffer (16 MiB) plus the float32 ``grad_weight`` and
``grad_hidden``. float32, bfloat16 and float16 inputs (float64 goes to the torch reference,
:attr:`Backend.dtypes`). The extension is built on first use
(see :mod:`.native`), never at import.

bf16 inputs of the one-pass path on CPUs with bf16 dot-product units (:func:`bf16_gemm_available`)
run :class:`Bf16ChunkKernels`: bf16 x bf16 -> float32 GEMMs (oneDNN's brgemm), the same float32
epilogues; elsewhere bf16 and float16 are converted to float32 (:class:`ChunkKernels`).
"""

from __future__ import annotations

import functools
import threading
from typing import Optional

import torch

from . import chunk_sizes, native
from .backends import Backend, ChunkGradBuffers, register_backend


def forward(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], labels: torch.Tensor, *,
            head, return_entropy: bool = False):
    """Contract forward; returns ``(logp[N], lse[N], entropy[N] | None)`` float32."""
    mod = native.load("cpu")
    with torch.no_grad():
        logp, lse, ent = mod.forward(hidden, weight, bias, labels, native.softcap_arg(head.softcap), head.temperature,
                                     bool(return_entropy), chunk_sizes.TWO_PASS_ELEMENTS)
    return logp, lse, (ent if return_entropy else None)


def backward(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], labels: torch.Tensor,
             lse: torch.Tensor, entropy: Optional[torch.Tensor], grad_logp: torch.Tensor, grad_lse: torch.Tensor,
             grad_entropy: Optional[torch.Tensor], *, head):
    """Contract backward; returns ``(grad_hidden[N,H], grad_weight[V,H], grad_bias[V] | None)`` float32."""
    mod = native.load("cpu")
    with torch.no_grad():
        gh, gw, gb = mod.backward(hidden, weight, bias, labels, lse, entropy if grad_entropy is not None else None,
                                  grad_logp, grad_lse, grad_entropy, native.softcap_arg(head.softcap), head.temperature,
                                  chunk_sizes.TWO_PASS_ELEMENTS)
    return gh, gw, (gb if bias is not None else None)


_workspace = threading.local()


def workspace(numel: int, name: str = "chunk", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """This thread's buffer ``name`` (the one-pass chunk buffer by default), at least ``numel``
    elements of ``dtype``, kept between calls.

    A fresh 128 MiB buffer per call costs its page faults and zeroing (1-2% of a forward +
    backward at 2048 x 512 x 32000 on one thread, measured with ``perf``); torch's CPU allocator
    does not cache, so the backend keeps its buffers per thread (the chunk buffer: at most
    ``chunk_sizes.CPU_SINGLE_PASS_ELEMENTS`` floats; the bf16 path's packed weight and float32
    ``grad_weight`` accumulator: weight-sized, whose page faults were 8% of a step at 1024 x 1024
    x 32000), as the CUDA caching allocator does on GPUs. :func:`release_workspace` frees them."""
    bufs = getattr(_workspace, "bufs", None)
    if bufs is None:
        _workspace.bufs = bufs = {}
    buf = bufs.get(name)
    if buf is None or buf.numel() < numel or buf.dtype != dtype:
        bufs[name] = buf = None  # free the old one before allocating the larger
        bufs[name] = buf = torch.empty(numel, dtype=dtype)
    return buf


def release_workspace() -> None:
    """Free this thread's buffers (benchmarks call it so that a measured peak includes them)."""
    _workspace.bufs = {}


class ChunkKernels(ChunkGradBuffers):
    """One-pass chunk kernels of the ``cpu`` backend (contract in :mod:`fdiv_kernels.kernels.backends`).

    The C++ ``chunk_stats`` keeps the chunk's ``z = cap(h W^T + b) / T`` in a reused float32
    buffer; ``chunk_grads`` turns it into ``dL/draw`` in place and runs both gradient GEMMs tile by
    tile. bf16/fp16 inputs are converted to float32 once per call (weight) and once per chunk
    (hidden rows).
    """

    dtype = torch.float32

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], head, *, return_entropy: bool,
                 need_h: bool, need_w: bool, need_b: bool) -> None:
        self.mod = native.load("cpu")
        self.w = weight.detach().to(torch.float32).contiguous()
        self.b = None if bias is None else bias.detach().to(torch.float32).contiguous()
        self.cap, self.temperature, self.return_entropy = native.softcap_arg(head.softcap), float(head.temperature), return_entropy
        self.need_h = need_h
        v, h = weight.shape
        self.grad_w = torch.empty((v, h), dtype=torch.float32) if need_w else None
        self.grad_b = torch.empty(v, dtype=torch.float32) if need_b else None
        self._h = None

    def stats(self, h: torch.Tensor, y: torch.Tensor):
        h32 = h.detach().to(torch.float32).contiguous()
        n = h32.shape[0]
        self.buf = workspace(n * self.w.shape[0])
        self._h = h32
        logp, lse, ent = self.mod.chunk_stats(h32, self.w, self.b, y, self.buf, self.cap,
                                              self.temperature, self.return_entropy, chunk_sizes.cpu_tile_cols(n))
        return logp, lse, (ent if self.return_entropy else None)

    def argmax(self) -> torch.Tensor:
        """``[n]`` int64: each row's largest logit's index from the kept logits of the last
        :meth:`stats` (before :meth:`grads` overwrites them; no GEMM)."""
        return self.mod.row_argmax(self.buf, self._h.shape[0], self.w.shape[0])

    def grads(self, h, y, lse, ent, g, k, e, *, alpha: float = 1.0, beta: float = 1.0):
        h32, self._h = self._h, None
        beta = self._accumulate_beta(beta)
        return self.mod.chunk_grads(h32, self.w, y, self.buf, _f32(lse), _f32(ent) if e is not None else None,
                                    _f32(g), _f32(k), _f32(e), self.cap, self.temperature, self.grad_w, self.grad_b,
                                    float(alpha), float(beta), self.need_h, chunk_sizes.cpu_tile_cols(h32.shape[0]))



class Bf16ChunkKernels(ChunkGradBuffers):
    """One-pass chunk kernels of bf16 inputs on CPUs with bf16 dot-product units (:func:`bf16_gemm_available`).

    The three GEMMs are bf16 x bf16 -> float32 oneDNN brgemm calls (``at::native::cpublas::brgemm``:
    AVX512-BF16 or AMX, float32 accumulation, float32 logits); the epilogues are the float32 ones.
    The weight is packed once per call into the two layouts brgemm reads (``W^T`` and ``W`` with
    pairs of rows interleaved: twice the weight's bf16 size), the chunk's hidden rows once per
    chunk (``h^T``). The coefficient is rounded to bf16 for the two gradient GEMMs (as Liger and Cut
    Cross-Entropy do); ``grad_weight`` is accumulated in float32 (transposed, ``[H, V]``) and
    returned in bf16 by :meth:`results`, ``grad_hidden`` per chunk in float32.
    """

    dtype = torch.float32

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], head, *, return_entropy: bool,
                 need_h: bool, need_w: bool, need_b: bool) -> None:
        self.mod = native.load("cpu")
        w = weight.detach()
        self.vocab, self.hidden = w.shape
        k, v2 = self.hidden + self.hidden % 2, self.vocab + self.vocab % 2
        # [K/2, V, 2]: B of the logits GEMM (fresh: its memory becomes the bf16 grad_weight)
        self.w_t = self.mod.pack_weight_t_bf16(w)
        # [V2/2, K, 2]: B of the grad_h GEMM, and the float32 grad_W^T accumulator, in workspaces
        self.w_n = self.mod.pack_weight_bf16(w, workspace(v2 * k, "w_vnni", torch.bfloat16)) if need_h else None
        self.b = None if bias is None else bias.detach().to(torch.float32).contiguous()
        self.cap, self.temperature, self.return_entropy = native.softcap_arg(head.softcap), float(head.temperature), return_entropy
        self.need_h = need_h
        self.grad_w = workspace(k * self.vocab, "grad_wt")[:k * self.vocab].view(k, self.vocab) if need_w else None
        self.grad_b = torch.empty(self.vocab, dtype=torch.float32) if need_b else None

    def stats(self, h: torch.Tensor, y: torch.Tensor):
        h = h.detach().contiguous()
        n = h.shape[0]
        tile = chunk_sizes.cpu_bf16_tile_cols(self.vocab)
        v2 = self.vocab + self.vocab % 2
        c = min(tile, v2)
        scratch_floats = (2 * n + 2) * c  # bf16 coefficient operands of two tiles (n * c + n2 * c each)
        self.buf = workspace(n * self.vocab + scratch_floats)
        self.scratch = self.buf[n * self.vocab:].view(torch.bfloat16)
        hk = _even_cols(h)
        logp, lse, ent = self.mod.chunk_stats_bf16(hk, self.w_t, self.b, y, self.buf, self.cap, self.temperature,
                                                   self.return_entropy, tile)
        self._rows = n
        return logp, lse, (ent if self.return_entropy else None)

    def argmax(self) -> torch.Tensor:
        """As :meth:`ChunkKernels.argmax` (the kept float32 logits)."""
        return self.mod.row_argmax(self.buf, self._rows, self.vocab)

    def grads(self, h, y, lse, ent, g, k, e, *, alpha: float = 1.0, beta: float = 1.0):
        beta = self._accumulate_beta(beta)
        gh = self.mod.chunk_grads_bf16(_even_cols(h.detach().contiguous()), self.w_n, y, self.buf,
                                       self.scratch, _f32(lse), _f32(ent) if e is not None else None, _f32(g), _f32(k),
                                       _f32(e), self.cap, self.temperature, self.grad_w, self.grad_b, float(alpha),
                                       float(beta), self.need_h, self.vocab, chunk_sizes.cpu_bf16_tile_cols(self.vocab))
        return None if gh is None else gh[:, :self.hidden]  # a padded hidden unit's column dropped

    def results(self):
        grad_wt, grad_b = super().results()
        if grad_wt is None:
            return None, grad_b
        # the bf16 gradient goes into the packed W^T's memory (no longer read; as large when H is
        # even), and the float32 accumulator is freed
        storage, self.w_t, self.grad_w = self.w_t, None, None
        return self.mod.unpack_grad_weight_bf16(grad_wt, self.hidden, storage), grad_b




def _even_cols(h: torch.Tensor) -> torch.Tensor:
    """``h [n, H]``, with a zero column when ``H`` is odd (the bf16 GEMMs' inner dimension is even)."""
    return h if h.shape[1] % 2 == 0 else torch.nn.functional.pad(h, (0, 1))


def _f32(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.to(torch.float32).contiguous()


def bf16_gemm_available() -> bool:
    """Whether bf16 inputs run their GEMMs on this CPU's bf16 units: AVX512-BF16 (or AMX) and torch's
    oneDNN brgemm present and working (a probe, once per process), oneDNN not switched off
    (``torch.backends.mkldnn.enabled``, read at each call). Elsewhere bf16 inputs are converted to
    float32 (:class:`ChunkKernels`)."""
    return bool(torch.backends.mkldnn.enabled) and _bf16_probe()


@functools.lru_cache(maxsize=None)
def _bf16_probe() -> bool:
    return bool(native.load("cpu").bf16_gemm_probe())


def single_pass(weight: torch.Tensor, bias: Optional[torch.Tensor], head, **kw) -> ChunkGradBuffers:
    """The cpu backend's one-pass chunk kernels for ``weight``'s dtype: :class:`Bf16ChunkKernels` for
    bf16 on CPUs with bf16 units, :class:`ChunkKernels` (float32 GEMMs) otherwise."""
    if weight.dtype == torch.bfloat16 and bf16_gemm_available():
        return Bf16ChunkKernels(weight, bias, head, **kw)
    return ChunkKernels(weight, bias, head, **kw)


register_backend(Backend(
    name="cpu",
    forward=forward,
    backward=backward,
    device_types=("cpu",),
    is_available=lambda: native.status("cpu"),
    priority=10,
    dtypes=(torch.float32, torch.bfloat16, torch.float16),
    single_pass=single_pass,
    chunk_tokens=chunk_sizes.cpu_chunk_tokens,
))
