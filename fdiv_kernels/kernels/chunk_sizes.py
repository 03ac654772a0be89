"""How many logits each backend holds at once: every backend's chunk-size rule, in one module.

No backend allocates the ``[N, V]`` logits; each visits them in chunks whose size is set here.

* ``torch`` backend (any device) and the ``cpu`` backend's two-pass kernels:
  :data:`TWO_PASS_ELEMENTS` = 2**22 float32 logits (16 MiB) per chunk; the torch backend takes
  :func:`torch_rows` whole rows, the cpu backend a ``[rows, cols]`` tile (:func:`cpu_tile_shape`).
* ``torch`` backend, one pass: :data:`TORCH_SINGLE_PASS_BYTES` = 64 MiB of chunk buffers
  (:func:`torch_chunk_tokens`: the compute-dtype logits, plus their 16-bit copy for 16-bit inputs).
* ``cpu`` backend, one pass: :data:`CPU_SINGLE_PASS_ELEMENTS` = 2**25 float32 logits (128 MiB)
  per chunk (:func:`cpu_chunk_tokens`), reduced in vocabulary tiles of the same size; bf16 inputs
  (bf16 GEMMs, ``cpu_backend.Bf16ChunkKernels``): :data:`CPU_BF16_SINGLE_PASS_ELEMENTS` = 2**23
  (32 MiB) per chunk but at least :data:`CPU_BF16_MIN_TOKENS` tokens, in vocabulary tiles of
  :data:`CPU_BF16_TILE_COLS` columns.
* GPU backends (``cuda``, ``triton``): the knob ``gpu_chunk_bytes`` (``FDIV_CUDA_CHUNK_BYTES``,
  default 1 GiB; :mod:`fdiv_kernels.knobs`), the float32 logits of a one-pass chunk
  (:func:`gpu_chunk_tokens`; the 16-bit coefficient is written over them); the cuda backend's
  two-pass chunks hold float32 logits plus a 16-bit coefficient, ``gpu_chunk_bytes / 6``
  elements (:func:`cuda_two_pass_rows`).

The functions read the knob and these module constants at each call, so a test (or a benchmark)
may set them (``fk.config(gpu_chunk_bytes=...)``; the constants on this module).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import knobs

#: float32 logits per chunk of the two-pass torch and cpu kernels (16 MiB)
TWO_PASS_ELEMENTS = 2 ** 22
#: bytes of chunk buffers of the torch backend's one pass (64 MiB): its per-chunk costs (the
#: float32 grad_weight read and written once per chunk, the GEMMs' fixed costs, a few small kernels
#: per chunk) are amortised over a few hundred rows, and the buffer is at most 64 MiB whatever N
TORCH_SINGLE_PASS_BYTES = 2 ** 26
#: float32 logits per one-pass chunk of the cpu backend, and per vocabulary tile within it (128 MiB)
CPU_SINGLE_PASS_ELEMENTS = 2 ** 25
#: float32 logits per one-pass chunk of the cpu backend for bf16 inputs (32 MiB): the bf16 GEMMs
#: run at full speed on chunks of a few hundred tokens, and the bf16 path also holds the packed
#: weight (twice its bf16 size) and a float32 grad_weight accumulator, so its chunk is smaller
CPU_BF16_SINGLE_PASS_ELEMENTS = 2 ** 23
#: ... but never fewer tokens than this (the grad_weight GEMM's inner dimension; 64 MiB at V = 64000)
CPU_BF16_MIN_TOKENS = 256
#: vocabulary columns per tile of a bf16 chunk: the gradient GEMMs run tile by tile (one parallel
#: region per tile), the bf16 coefficient of two tiles in a scratch buffer (2 x 2 x n x 4096 bf16:
#: 8 MiB at n = 256); 8192 was 30% slower in the grad_h GEMM at 2048 x 256 x 32000 (one thread)
CPU_BF16_TILE_COLS = 4096
#: GPU chunks are a multiple of this many rows (GEMM tile rows) when they have that many
ROW_ALIGN = 256


def torch_rows(vocab_size: int, chunk_elements: Optional[int] = None) -> int:
    """Rows per chunk of the torch backend: ``max(1, TWO_PASS_ELEMENTS // V)``."""
    budget = TWO_PASS_ELEMENTS if chunk_elements is None else chunk_elements
    return max(1, budget // max(1, vocab_size))


def torch_chunk_tokens(vocab_size: int, hidden_size: int, dtype: torch.dtype) -> int:
    """Tokens per one-pass chunk of the torch backend: ``TORCH_SINGLE_PASS_BYTES`` over the bytes a
    row of the vocabulary takes in its buffers (the logits in float32, or float64 for float64 inputs,
    plus a 16-bit copy of the coefficient for 16-bit inputs), rounded down to a multiple of 64."""
    per_logit = 8 if dtype == torch.float64 else (4 + (2 if dtype in (torch.bfloat16, torch.float16) else 0))
    n = max(1, TORCH_SINGLE_PASS_BYTES // (per_logit * max(1, vocab_size)))
    return n if n < 64 else n - n % 64


def cpu_tile_shape(num_rows: int, vocab_size: int, chunk_elements: Optional[int] = None) -> Tuple[int, int]:
    """``(rows, cols)`` of the cpu backend's two-pass logits tiles, ``rows * cols <= TWO_PASS_ELEMENTS``,
    about square (mirrors ``pick_tiling`` in csrc/cpu/token_stats_cpu.cpp; docs/building.md)."""
    ce = TWO_PASS_ELEMENTS if chunk_elements is None else chunk_elements
    side = 1
    while (2 * side) ** 2 <= ce:
        side *= 2
    rows = max(1, min(num_rows, side))
    cols = max(1, min(vocab_size, ce // rows))
    return max(1, min(num_rows, max(rows, ce // cols))), cols


def cpu_chunk_tokens(vocab_size: int, hidden_size: int, dtype: torch.dtype) -> int:
    """Tokens per one-pass chunk of the cpu backend: ``CPU_SINGLE_PASS_ELEMENTS // V`` (bf16:
    ``max(CPU_BF16_MIN_TOKENS, CPU_BF16_SINGLE_PASS_ELEMENTS // V)``) rounded down to a multiple of 64."""
    if dtype == torch.bfloat16:
        n = max(CPU_BF16_MIN_TOKENS, CPU_BF16_SINGLE_PASS_ELEMENTS // max(1, vocab_size))
    else:
        n = max(1, CPU_SINGLE_PASS_ELEMENTS // max(1, vocab_size))
    return n if n < 64 else n - n % 64


def cpu_tile_cols(rows: int) -> int:
    """Vocabulary columns per tile of a cpu one-pass chunk of ``rows`` tokens (at least 64)."""
    return max(64, CPU_SINGLE_PASS_ELEMENTS // max(1, rows))


def cpu_bf16_tile_cols(vocab_size: int) -> int:
    """Vocabulary columns per tile of a bf16 cpu chunk: :data:`CPU_BF16_TILE_COLS` (even, as the
    bf16 GEMMs' operand layout needs)."""
    return CPU_BF16_TILE_COLS + CPU_BF16_TILE_COLS % 2


def aligned_rows(rows: int) -> int:
    """Rows rounded down to a multiple of :data:`ROW_ALIGN` when there are that many (else at least 1)."""
    return max(1, rows) if rows < ROW_ALIGN else rows - rows % ROW_ALIGN


def gpu_chunk_tokens(vocab_size: int, hidden_size: int, dtype: torch.dtype) -> int:
    """Tokens per one-pass chunk on a GPU: ``gpu_chunk_bytes // (4 V)`` rounded down to a multiple of
    256, at least 256: 2048 at V = 128256 and 1024 at V = 256000 with the default 1 GiB (about the
    fewest rows that keep the grad_weight GEMM, which reads and writes the fp32 ``[V, H]``
    accumulator once per chunk, compute-bound on an H100)."""
    return max(ROW_ALIGN, aligned_rows(knobs.get("gpu_chunk_bytes") // (4 * max(1, vocab_size))))


def cuda_two_pass_rows(vocab_size: int) -> int:
    """Rows per two-pass chunk of the cuda backend: ``gpu_chunk_bytes / 6`` logits (float32 logits
    plus a 16-bit coefficient) over V, a multiple of 256 (1280 at V = 128256)."""
    return aligned_rows(knobs.get("gpu_chunk_bytes") // 6 // max(1, vocab_size))


# --- distillation (fk.distill_loss): two float32 [rows, V] buffers per chunk, teacher's and student's ---

#: float32 logits per buffer of a cpu distillation chunk (64 MiB: two buffers, 128 MiB in all)
CPU_DISTILL_ELEMENTS = 2 ** 24


def distill_torch_tokens(vocab_size: int) -> int:
    """Rows per distillation chunk of the torch backend: :func:`torch_rows` (two 16 MiB buffers)."""
    return torch_rows(vocab_size)


def distill_cpu_tokens(vocab_size: int) -> int:
    """Rows per distillation chunk of the cpu backend: ``CPU_DISTILL_ELEMENTS // V``, a multiple of
    64 when there are that many (512 at V = 32000)."""
    n = max(1, CPU_DISTILL_ELEMENTS // max(1, vocab_size))
    return n if n < 64 else n - n % 64


def distill_gpu_tokens(vocab_size: int) -> int:
    """Rows per distillation chunk on a GPU: half of :func:`gpu_chunk_tokens`' budget per buffer
    (``gpu_chunk_bytes // (8 V)``, a multiple of 256, at least 256)."""
    return max(ROW_ALIGN, aligned_rows(knobs.get("gpu_chunk_bytes") // (8 * max(1, vocab_size))))
