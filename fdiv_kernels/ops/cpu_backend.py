"""The ``"cpu"`` backend: the C++ extension (``csrc/cpu``), ATen GEMMs + a fused C++ epilogue.

Same contract as :mod:`fdiv_kernels.ops.torch_chunked` (valid rows only, float32 outputs).
Per chunk of ``chunk_rows(V)`` token rows it runs one GEMM into a reused float32 logits buffer
(``hidden @ weight.T + bias``, MKL/OpenBLAS through ATen) and a fused epilogue per row,
parallelised over rows with ``at::parallel_for``:

* forward: soft-cap/temperature, max, ``sum exp``, label pick and entropy in two passes over the
  row while it sits in cache;
* backward: the logits chunk is recomputed and overwritten in place by
  ``dL/draw = dz/draw * (g onehot(y) + (k - g) p - e p (z - (lse - ent)))``, then both GEMMs
  (``grad_hidden = coef @ W``, ``grad_weight += coef^T h``) use that same chunk.

Peak extra memory: one ``[chunk_rows, V]`` float32 buffer (plus the float32 ``grad_weight``
accumulator, and a float32 copy of the weight for bf16/fp16 inputs). float64 inputs are handed
to the torch reference. The extension is built on first use (see :mod:`.native`), never at import.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from . import native, torch_chunked
from .backends import Backend, register_backend

#: float32 logits per chunk (rows = CHUNK_ELEMENTS // V); 4 MiB stays near the last-level cache
#: while keeping the grad_weight GEMM's inner dimension large enough (see bench/bench_cpu_backend.py).
CHUNK_ELEMENTS = int(os.environ.get("FDIV_CPU_CHUNK_ELEMENTS", 2 ** 20))


def chunk_rows(vocab_size: int, chunk_elements: Optional[int] = None) -> int:
    """Token rows per logits chunk: ``max(1, chunk_elements // vocab_size)``."""
    ce = CHUNK_ELEMENTS if chunk_elements is None else chunk_elements
    return max(1, ce // max(1, vocab_size))


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
                                     chunk_rows(weight.shape[0]))
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
                                  _cap(softcap), float(temperature), chunk_rows(weight.shape[0]))
    return gh, gw, (gb if bias is not None else None)


register_backend(Backend(
    name="cpu",
    forward=forward,
    backward=backward,
    device_types=("cpu",),
    is_available=lambda: native.status("cpu"),
    priority=10,
))
