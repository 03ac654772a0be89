"""The ``"cuda"`` backend: cuBLAS GEMMs per chunk + lean CUDA epilogues (``csrc/cuda``).

Same contract as :mod:`fdiv_kernels.ops.torch_chunked`. Per chunk of ``chunk_rows(V)`` token rows:

* forward: ``raw = h @ W.T`` (bf16/fp16 operands with a float32 output through
  ``torch.mm(..., out_dtype=float32)``; float32 GEMM for float32 inputs), then one CUDA block per
  row adds the bias, applies soft-cap/temperature and runs an online log-sum-exp that also
  yields the label log-prob and the entropy (one read of the logits);
* backward: ``raw`` is recomputed, an elementwise kernel writes the coefficient
  ``dL/draw`` in the weight's dtype, and ``grad_hidden = coef @ W`` and ``grad_weight += coef^T h``
  (float32 accumulators) use that same chunk.

For bf16/fp16 inputs the coefficient is rounded to the input dtype before the two backward
GEMMs (as in Liger and Cut Cross-Entropy), so gradients agree with the float32 reference to
bf16/fp16 precision; forward values are computed from float32 logits. float64 inputs go to the
torch reference. The extension is built on first use (needs nvcc; see docs/building.md).
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from . import native, torch_chunked
from .backends import Backend, register_backend

#: logits per chunk (rows = CHUNK_ELEMENTS // V): 2**25 float32 = 128 MiB.
CHUNK_ELEMENTS = int(os.environ.get("FDIV_CUDA_CHUNK_ELEMENTS", 2 ** 25))
_state = {"mixed_gemm": os.environ.get("FDIV_CUDA_MIXED_GEMM", "1") != "0"}


def chunk_rows(vocab_size: int, chunk_elements: Optional[int] = None) -> int:
    ce = CHUNK_ELEMENTS if chunk_elements is None else chunk_elements
    return max(1, ce // max(1, vocab_size))


def _call(run):
    """``run(mixed_gemm)`` with bf16/fp16 x bf16/fp16 -> fp32 GEMMs; if torch lacks them, fall back once."""
    try:
        return run(_state["mixed_gemm"])
    except RuntimeError as exc:
        if not _state["mixed_gemm"] or "dtype" not in str(exc).lower():
            raise
        _state["mixed_gemm"] = False
        native.logger.warning("fdiv_kernels: cuda backend falls back to input-dtype GEMMs: %s", exc)
        return run(False)


def _is_reduced(t: torch.Tensor) -> bool:
    return t.dtype in (torch.bfloat16, torch.float16)


def forward(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], labels: torch.Tensor, *,
            softcap: Optional[float] = None, temperature: float = 1.0, return_entropy: bool = False):
    """Contract forward; returns ``(logp[N], lse[N], entropy[N] | None)`` float32."""
    if hidden.dtype == torch.float64:
        return torch_chunked.forward(hidden, weight, bias, labels, softcap=softcap, temperature=temperature,
                                     return_entropy=return_entropy)
    mod = native.load("cuda")
    with torch.no_grad(), torch.cuda.device(hidden.device):
        stream = torch.cuda.current_stream(hidden.device).cuda_stream

        def run(mixed):
            return mod.forward(hidden.contiguous(), weight.contiguous(), bias, labels.long().contiguous(),
                               0.0 if softcap is None else float(softcap), float(temperature), bool(return_entropy),
                               chunk_rows(weight.shape[0]), mixed and _is_reduced(hidden), stream)

        logp, lse, ent = _call(run)
    return logp, lse, (ent if return_entropy else None)


def backward(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], labels: torch.Tensor,
             lse: torch.Tensor, entropy: Optional[torch.Tensor], grad_logp: torch.Tensor, grad_lse: torch.Tensor,
             grad_entropy: Optional[torch.Tensor], *, softcap: Optional[float] = None, temperature: float = 1.0):
    """Contract backward; returns ``(grad_hidden, grad_weight, grad_bias | None)`` float32."""
    if hidden.dtype == torch.float64:
        return torch_chunked.backward(hidden, weight, bias, labels, lse, entropy, grad_logp, grad_lse, grad_entropy,
                                      softcap=softcap, temperature=temperature)
    if grad_entropy is not None and entropy is None:
        raise ValueError("grad_entropy needs the entropy saved by forward(return_entropy=True)")
    mod = native.load("cuda")
    with torch.no_grad(), torch.cuda.device(hidden.device):
        stream = torch.cuda.current_stream(hidden.device).cuda_stream

        def run(mixed):
            return mod.backward(hidden.contiguous(), weight.contiguous(), bias, labels.long().contiguous(), lse,
                                entropy if grad_entropy is not None else None, grad_logp, grad_lse, grad_entropy,
                                0.0 if softcap is None else float(softcap), float(temperature),
                                chunk_rows(weight.shape[0]), mixed and _is_reduced(hidden), stream)

        gh, gw, gb = _call(run)
    return gh, gw, (gb if bias is not None else None)


# --------------------------------------------------------------------------------------------
# One-pass chunk kernels (fdiv_kernels/ops/fused.py)
# --------------------------------------------------------------------------------------------

#: one-pass chunk budget: the float32 logits of one chunk (the bf16/fp16 coefficient is written
#: over them in place, see csrc/cuda/launchers.h), 1 GiB by default; rows are a multiple of 256.
CHUNK_BYTES = int(os.environ.get("FDIV_CUDA_CHUNK_BYTES", 2 ** 30))
ROW_ALIGN = 256


def chunk_tokens(vocab_size: int, hidden_size: int, dtype: torch.dtype) -> int:
    """Tokens per one-pass chunk: ``CHUNK_BYTES // (4 V)`` rounded down to a multiple of 256 (at
    least 256): 2048 at V = 128256, 1024 at V = 256000 with the default 1 GiB."""
    rows = CHUNK_BYTES // (4 * max(1, vocab_size))
    return max(ROW_ALIGN, rows - rows % ROW_ALIGN)


def _mm_f32(a: torch.Tensor, b: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``a @ b`` with a float32 result: bf16/fp16 operands, fp32 accumulation and output (cuBLAS)."""
    if a.dtype == torch.float32:
        return torch.mm(a, b, out=out)
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32, out=out)
    return torch.mm(a.float(), b.float(), out=out)  # the CPU twin (tests): same math


def _addmm_f32(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, beta: float, alpha: float) -> None:
    """``c = beta c + alpha a @ b`` in place on the float32 ``c`` (``beta = 0``: ``c`` is not read)."""
    if a.dtype == torch.float32:
        c.addmm_(a, b, beta=beta, alpha=alpha)
    elif a.is_cuda:
        torch.addmm(c, a, b, beta=beta, alpha=alpha, out_dtype=torch.float32, out=c)
    else:
        c.addmm_(a.float(), b.float(), beta=beta, alpha=alpha)


class ChunkKernels:
    """One-pass chunk kernels of the ``cuda`` backend (contract in :mod:`fdiv_kernels.ops.backends`).

    Per chunk of ``n`` rows: ``z = h W^T`` by cuBLAS into a reused float32 buffer (bf16/fp16
    operands, fp32 accumulation and output); the forward epilogue (one read of ``z``: bias,
    soft-cap, temperature, online lse, label, entropy); the coefficient epilogue (one read of ``z``,
    one write of ``dL/draw`` in the input dtype over the same rows); then ``grad_h = coef W`` and
    ``grad_W = beta grad_W + alpha coef^T h`` (cuBLAS, fp32 accumulation and output). Passes over
    a chunk's logits besides the GEMMs: two reads of float32 and one write of the coefficient.
    ``mod`` replaces the extension's epilogues (the CPU twin in the tests).
    """

    dtype = torch.float32

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], head, *, return_entropy: bool,
                 need_h: bool, need_w: bool, need_b: bool, mod=None) -> None:
        self.mod = native.load("cuda") if mod is None else mod
        self.w = weight.detach().contiguous()
        self.b = None if bias is None else bias.detach().to(torch.float32).contiguous()
        self.cap = 0.0 if head.softcap is None else float(head.softcap)
        self.temperature, self.return_entropy, self.need_h = float(head.temperature), return_entropy, need_h
        v, h = weight.shape
        dev = weight.device
        self.grad_w = torch.empty((v, h), dtype=torch.float32, device=dev) if need_w else None
        self.grad_b = torch.empty(v, dtype=torch.float32, device=dev) if need_b else None
        self.buf = torch.empty(0, dtype=torch.float32, device=dev)
        self._written = False
        self._n = 0

    def _stream(self) -> int:
        return torch.cuda.current_stream(self.w.device).cuda_stream if self.w.is_cuda else 0

    def _views(self, n: int):
        """The chunk's float32 ``z [n, V]`` and its coefficient view (same storage; for 16-bit
        inputs the first half of each float32 row, row stride 2V)."""
        v = self.w.shape[0]
        flat = self.buf[:n * v]
        z = flat.view(n, v)
        coef = z if self.w.dtype == torch.float32 else flat.view(self.w.dtype).view(n, 2 * v)[:, :v]
        return z, coef

    def stats(self, h: torch.Tensor, y: torch.Tensor):
        n, v = h.shape[0], self.w.shape[0]
        if self.buf.numel() < n * v:
            self.buf = torch.empty(n * v, dtype=torch.float32, device=self.w.device)
        z, _ = self._views(n)
        _mm_f32(h, self.w.t(), out=z)
        self._n = n
        logp, lse, ent = self.mod.chunk_forward_epilogue(z, self.b, y.contiguous(), self.cap, self.temperature,
                                                         self.return_entropy, self._stream())
        return logp, lse, (ent if self.return_entropy else None)

    def grads(self, h, y, lse, ent, g, k, e, *, alpha: float = 1.0, beta: float = 1.0):
        z, coef = self._views(self._n)
        self.mod.chunk_coef_epilogue(z, coef, self.b, y.contiguous(), lse, ent if e is not None else None, g, k, e,
                                     self.cap, self.temperature, self._stream())
        beta = beta if self._written else 0.0
        self._written = True
        if self.grad_w is not None:
            _addmm_f32(self.grad_w, coef.t(), h, beta=beta, alpha=alpha)
        if self.grad_b is not None:
            col = coef.sum(0, dtype=torch.float32)
            if beta:
                self.grad_b.mul_(beta).add_(col, alpha=alpha)
            else:
                torch.mul(col, alpha, out=self.grad_b)
        return _mm_f32(coef, self.w) if self.need_h else None

    def results(self):
        if not self._written:
            for t in (self.grad_w, self.grad_b):
                if t is not None:
                    t.zero_()
        return self.grad_w, self.grad_b


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
    priority=15,
    dtypes=(torch.float32, torch.bfloat16, torch.float16),
    single_pass=ChunkKernels,
    chunk_tokens=chunk_tokens,
))
