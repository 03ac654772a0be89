"""The ``"cpu"`` backend: the C++ extension (``csrc/cpu``), ATen GEMMs + a fused C++ epilogue.

Same contract as :mod:`fdiv_kernels.ops.torch_chunked` (valid rows only, float32 outputs).
The ``[N, V]`` logits are visited in tiles of ``tile_shape(N, V)`` = (token rows, vocabulary
columns) with ``rows * cols <= CHUNK_ELEMENTS``: one GEMM per tile into a reused float32 buffer
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
``grad_hidden``. float64 inputs go to the torch reference. The extension is built on first use
(see :mod:`.native`), never at import.
"""

from __future__ import annotations

import os
import threading
from typing import Optional, Tuple

import torch

from . import native, torch_chunked
from .backends import Backend, register_backend

#: float32 logits per tile (16 MiB, as the torch backend's chunk); tiles are [rows, cols] blocks
#: of tokens x vocabulary, about sqrt(CHUNK_ELEMENTS) on each side when the problem allows.
CHUNK_ELEMENTS = int(os.environ.get("FDIV_CPU_CHUNK_ELEMENTS", 2 ** 22))


def tile_shape(num_rows: int, vocab_size: int, chunk_elements: Optional[int] = None) -> Tuple[int, int]:
    """``(rows, cols)`` of the logits tiles the C++ code uses (mirrors ``pick_tiling`` there)."""
    ce = CHUNK_ELEMENTS if chunk_elements is None else chunk_elements
    side = 1
    while (2 * side) ** 2 <= ce:
        side *= 2
    rows = max(1, min(num_rows, side))
    cols = max(1, min(vocab_size, ce // rows))
    return max(1, min(num_rows, max(rows, ce // cols))), cols


def _cap(softcap: Optional[float]) -> float:
    return 0.0 if softcap is None else float(softcap)


def forward(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], labels: torch.Tensor, *,
            softcap: Optional[float] = None, temperature: float = 1.0, return_entropy: bool = False):
    """Contract forward; returns ``(logp[N], lse[N], entropy[N] | None)`` float32."""
    if hidden.dtype == torch.float64:
        return torch_chunked.forward(hidden, weight, bias, labels, softcap=softcap, temperature=temperature,
                                     return_entropy=return_entropy)
    mod = native.load("cpu")
    with torch.no_grad():
        logp, lse, ent = mod.forward(hidden.contiguous(), weight.contiguous(), bias, labels.long().contiguous(),
                                     _cap(softcap), float(temperature), bool(return_entropy),
                                     CHUNK_ELEMENTS)
    return logp, lse, (ent if return_entropy else None)


def backward(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], labels: torch.Tensor,
             lse: torch.Tensor, entropy: Optional[torch.Tensor], grad_logp: torch.Tensor, grad_lse: torch.Tensor,
             grad_entropy: Optional[torch.Tensor], *, softcap: Optional[float] = None, temperature: float = 1.0):
    """Contract backward; returns ``(grad_hidden[N,H], grad_weight[V,H], grad_bias[V] | None)`` float32."""
    if hidden.dtype == torch.float64:
        return torch_chunked.backward(hidden, weight, bias, labels, lse, entropy, grad_logp, grad_lse, grad_entropy,
                                      softcap=softcap, temperature=temperature)
    if grad_entropy is not None and entropy is None:
        raise ValueError("grad_entropy needs the entropy saved by forward(return_entropy=True)")
    mod = native.load("cpu")
    with torch.no_grad():
        gh, gw, gb = mod.backward(hidden.contiguous(), weight.contiguous(), bias, labels.long().contiguous(), lse,
                                  entropy if grad_entropy is not None else None, grad_logp, grad_lse, grad_entropy,
                                  _cap(softcap), float(temperature), CHUNK_ELEMENTS)
    return gh, gw, (gb if bias is not None else None)


#: one-pass chunks: float32 logits kept per chunk (128 MiB) and vocabulary columns per tile
#: (each tile is reduced while it is in cache; ~4 MiB per tile).
SINGLE_PASS_ELEMENTS = 2 ** 25
TILE_ELEMENTS = 2 ** 25


_workspace = threading.local()


def workspace(numel: int) -> torch.Tensor:
    """This thread's one-pass chunk buffer, at least ``numel`` float32, kept between calls.

    A fresh 128 MiB buffer per call costs its page faults and zeroing (1-2% of a forward +
    backward at 2048 x 512 x 32000 on one thread, measured with ``perf``); torch's CPU allocator
    does not cache, so the backend keeps one buffer per thread (at most ``SINGLE_PASS_ELEMENTS``
    floats), as the CUDA caching allocator does on GPUs. :func:`release_workspace` frees it."""
    buf = getattr(_workspace, "buf", None)
    if buf is None or buf.numel() < numel:
        _workspace.buf = buf = None  # free the old one before allocating the larger
        _workspace.buf = buf = torch.empty(numel, dtype=torch.float32)
    return buf


def release_workspace() -> None:
    """Free this thread's chunk buffer (benchmarks call it so that a measured peak includes it)."""
    _workspace.buf = None


def chunk_tokens(vocab_size: int, hidden_size: int, dtype: torch.dtype) -> int:
    """Tokens per one-pass chunk: ``SINGLE_PASS_ELEMENTS // V`` rounded down to a multiple of 64."""
    n = max(1, SINGLE_PASS_ELEMENTS // max(1, vocab_size))
    return n if n < 64 else n - n % 64


class ChunkKernels:
    """One-pass chunk kernels of the ``cpu`` backend (contract in :mod:`fdiv_kernels.ops.backends`).

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
        self.cap, self.temperature, self.return_entropy = _cap(head.softcap), float(head.temperature), return_entropy
        self.need_h = need_h
        v, h = weight.shape
        self.grad_w = torch.empty((v, h), dtype=torch.float32) if need_w else None
        self.grad_b = torch.empty(v, dtype=torch.float32) if need_b else None
        self._written = False
        self._h = None

    def _tile_cols(self, n: int) -> int:
        return max(64, TILE_ELEMENTS // max(1, n))

    def stats(self, h: torch.Tensor, y: torch.Tensor):
        h32 = h.detach().to(torch.float32).contiguous()
        n = h32.shape[0]
        self.buf = workspace(n * self.w.shape[0])
        self._h = h32
        logp, lse, ent = self.mod.chunk_stats(h32, self.w, self.b, y.contiguous(), self.buf, self.cap,
                                              self.temperature, self.return_entropy, self._tile_cols(n))
        return logp, lse, (ent if self.return_entropy else None)

    def grads(self, h, y, lse, ent, g, k, e, *, alpha: float = 1.0, beta: float = 1.0):
        h32, self._h = self._h, None
        beta = beta if self._written else 0.0
        self._written = True
        f32 = lambda t: None if t is None else t.to(torch.float32).contiguous()  # noqa: E731
        return self.mod.chunk_grads(h32, self.w, y.contiguous(), self.buf, f32(lse), f32(ent) if e is not None else None,
                                    f32(g), f32(k), f32(e), self.cap, self.temperature, self.grad_w, self.grad_b,
                                    float(alpha), float(beta), self.need_h, self._tile_cols(h32.shape[0]))

    def results(self):
        if not self._written:
            for t in (self.grad_w, self.grad_b):
                if t is not None:
                    t.zero_()
        return self.grad_w, self.grad_b


register_backend(Backend(
    name="cpu",
    forward=forward,
    backward=backward,
    device_types=("cpu",),
    is_available=lambda: native.status("cpu"),
    priority=10,
    dtypes=(torch.float32, torch.bfloat16, torch.float16),
    single_pass=ChunkKernels,
    chunk_tokens=chunk_tokens,
))
