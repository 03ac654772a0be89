"""Roofline cost model of the GPU backends: a design tool. **An estimate, not a measurement.**

    python -m bench.costmodel --shape 8192,4096,128256 --dtype bf16 [--gpu h100] [--markdown]

For every GPU backend and path, per kernel: FLOPs, DRAM bytes read and written, and a roofline
time ``max(FLOPs / peak, bytes / bandwidth)``; kernels run one after another (no overlap), so a
path's time is the sum. The ratio is to the 3-GEMM floor (``3 x 2 N H V`` FLOPs at the tensor-core
peak). The model follows the code's launch configuration: one-pass chunk rows from
``fdiv_kernels/kernels/chunk_sizes.gpu_chunk_tokens`` (both GPU backends), two-pass chunk rows
from ``chunk_sizes.cuda_two_pass_rows``, the Triton tile shapes from the first entry of each autotune list
(what ``FDIV_TRITON_AUTOTUNE=first`` and ``make gpu-check`` use).

Assumptions (crude by design; each one is named where it is used):

* GEMMs run at the tensor-core peak and move each operand and the output through DRAM once
  (cuBLAS's L2 blocking); ``beta = 1`` reads the output once more.
* Elementwise and row kernels move every element they touch once; no L2 reuse between kernels
  (a chunk's logits are 0.5-1 GiB, L2 is 50 MB).
* Triton flash kernels: a tile of ``W`` is shared in L2 by the token blocks that run at once
  (``SMS`` programs), so ``W`` comes from DRAM ``ceil(token blocks / SMS)`` times; the hidden
  tile each program re-loads for every vocabulary tile stays in L2 while the running programs'
  tiles fit in it, and the rest of those reloads go to DRAM. Read-modify-writes of fp32 partial
  results and atomic adds go to DRAM.
* Per chunk of the one-pass path, the spec's coefficient math is ``SPEC_KERNELS`` small kernels
  of ``SMALL_KERNEL_US`` each.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Dict, List, Tuple

GPUS = {
    # bf16/fp16 dense tensor-core FLOP/s, fp32 (tf32 off: FMA) FLOP/s, DRAM bytes/s, SMs, L2 bytes
    "h100": dict(tensor=800e12, fp32=60e12, dram=3.35e12, sms=132, l2=50e6,
                 note="H100 SXM: ~800 TFLOP/s bf16 (measured dense GEMM), 3.35 TB/s HBM3"),
    "h200": dict(tensor=790e12, fp32=60e12, dram=4.3e12, sms=132, l2=50e6,
                 note="H200: 790 TFLOP/s bf16 and 4.3 TB/s measured on the lent machine (8192^3 GEMM, D2D copy)"),
}
SPEC_KERNELS = 40
SMALL_KERNEL_US = 3.0
ELEM = {"bf16": 2, "fp16": 2, "fp32": 4}


@dataclass
class Kernel:
    name: str
    flops: float
    read: float
    write: float
    calls: int = 1
    fixed_s: float = 0.0  # launch-bound time that no roofline covers (small kernels)

    def time(self, gpu: dict, tensor: bool = True) -> float:
        peak = gpu["tensor"] if tensor else gpu["fp32"]
        return max(self.flops / peak, (self.read + self.write) / gpu["dram"]) + self.fixed_s


def _chunks(n: int, rows: int) -> List[int]:
    return [min(rows, n - s) for s in range(0, n, rows)]


def gemm_floor(n: int, h: int, v: int, s: int) -> List[Kernel]:
    """The three bare GEMMs of a fused loss' forward + backward, no epilogue."""
    return [Kernel("logits GEMM", 2 * n * h * v, (n * h + v * h) * s, n * v * s),
            Kernel("grad_hidden GEMM", 2 * n * h * v, (n * v + v * h) * s, n * h * s),
            Kernel("grad_weight GEMM", 2 * n * h * v, (n * v + n * h) * s, v * h * s)]


def one_pass(n: int, h: int, v: int, s: int, rows: int, coef_in_place: bool) -> List[Kernel]:
    """fdiv_kernels/kernels/gemm_chunks.py per chunk (the cuda and triton backends' one-pass path)."""
    out: List[Kernel] = []
    agg: Dict[str, Kernel] = {}

    def add(k: Kernel):
        if k.name in agg:
            a = agg[k.name]
            a.flops += k.flops
            a.read += k.read
            a.write += k.write
            a.calls += k.calls
            a.fixed_s += k.fixed_s
        else:
            agg[k.name] = k
            out.append(k)

    for i, r in enumerate(_chunks(n, rows)):
        add(Kernel("logits GEMM (fp32 out)", 2 * r * h * v, (r * h + v * h) * s, r * v * 4))
        add(Kernel("forward epilogue (1 read of z)", 0, r * v * 4, r * 12))
        add(Kernel("spec coefficients (small kernels)", 0, r * 64, r * 8, calls=SPEC_KERNELS,
                   fixed_s=SPEC_KERNELS * SMALL_KERNEL_US * 1e-6))
        add(Kernel("coefficient epilogue (read z, write coef" + (" in place)" if coef_in_place else ")"), 0,
                   r * v * 4, r * v * s))
        add(Kernel("grad_hidden GEMM", 2 * r * h * v, (r * v + v * h) * s, r * h * 4))
        beta_read = 0 if i == 0 else v * h * 4
        add(Kernel("grad_weight GEMM (fp32 acc, beta=1)", 2 * r * h * v, (r * v + r * h) * s + beta_read, v * h * 4))
    out.append(Kernel("final casts (grad_W, grad_h to the input dtype)", 0, (v * h + n * h) * 4, (v * h + n * h) * s))
    return out


def cuda_two_pass(n: int, h: int, v: int, s: int, rows: int) -> List[Kernel]:
    """backend='cuda' token_stats path: forward (GEMM + epilogue), backward (GEMM again + coef + 2 GEMMs)."""
    out = [Kernel("fwd logits GEMM", 2 * n * h * v, (n * h + v * h * len(_chunks(n, rows))) * s, n * v * 4),
           Kernel("fwd epilogue", 0, n * v * 4, n * 12),
           Kernel("bwd logits GEMM (recompute)", 2 * n * h * v, (n * h + v * h * len(_chunks(n, rows))) * s, n * v * 4),
           Kernel("bwd coefficient epilogue", 0, n * v * 4, n * v * s),
           Kernel("grad_hidden GEMM", 2 * n * h * v, (n * v + v * h * len(_chunks(n, rows))) * s, n * h * 4)]
    c = len(_chunks(n, rows))
    out.append(Kernel("grad_weight GEMM (fp32 acc)", 2 * n * h * v, (n * v + n * h) * s + (c - 1) * v * h * 4,
                      c * v * h * 4))
    return out


def _l2_miss(programs: int, tile_bytes: float, l2: float) -> float:
    """Share of re-loads of per-program tiles that miss L2 when ``programs`` tiles compete for it."""
    return max(0.0, 1.0 - l2 / max(1.0, programs * tile_bytes))


def triton_flash(n: int, h: int, v: int, s: int, gpu: dict, cfg: Dict[str, tuple], atomic: bool) -> List[Kernel]:
    """backend='triton' two-pass path: the flash kernels of fdiv_kernels/kernels/triton_kernels.py."""
    sms, l2 = gpu["sms"], gpu["l2"]
    bn, bv, _bh, *_ = cfg["fwd"]
    tb = math.ceil(n / bn)
    splits = max(1, min(math.ceil(2 * sms / tb), math.ceil(v / (4 * 256))))
    programs = min(tb * splits, sms)
    w_passes = max(1, math.ceil(tb / max(1, programs // splits)))
    h_reload = n * h * s * (v / bv) * _l2_miss(programs, bn * h * s, l2)
    out = [Kernel(f"fwd (tiles {bn}x{bv}, {splits} splits)", 2 * n * h * v, v * h * s * w_passes + n * h * s + h_reload,
                  n * splits * 16)]
    if atomic:
        bn, bv, _bh, _w, _st, _g = cfg["atomic"]
        tb, vb = math.ceil(n / bn), math.ceil(v / bv)
        out.append(Kernel(f"bwd atomic (tiles {bn}x{bv}): recompute + 2 GEMMs", 6 * n * h * v,
                          (n * h + v * h) * s * 2 + n * h * 4 * vb + v * h * 4 * tb,
                          n * h * 4 * vb + v * h * 4 * tb))
        return out
    bn, bv, _bh, _w, _st, stage = cfg["bwd_h"]
    tb = math.ceil(n / bn)
    spans = math.ceil(v / (bv * stage))
    out.append(Kernel(f"bwd grad_hidden (tiles {bn}x{bv}, STAGE {stage}): recompute + GEMM", 4 * n * h * v,
                      v * h * s * max(1, math.ceil(tb / sms)) * 2 + n * h * s + n * h * 4 * spans,
                      n * h * 4 * spans))
    bn, bv, _bh, _w, _st, stage = cfg["bwd_w"]
    vb = math.ceil(v / bv)
    spans = math.ceil(n / (bn * stage))
    out.append(Kernel(f"bwd grad_weight (tiles {bn}x{bv}, STAGE {stage}): recompute + GEMM", 4 * n * h * v,
                      n * h * s * max(1, math.ceil(vb / sms)) * 2 + v * h * s + v * h * 4 * spans,
                      v * h * 4 * spans))
    return out


def triton_configs() -> Dict[str, tuple]:
    """The first bf16 entry of each autotune list (imports the kernel tables without a GPU)."""
    import os
    os.environ.setdefault("TRITON_INTERPRET", "0")
    from fdiv_kernels.kernels import triton_kernels as K
    return {"fwd": K._entry(K._FWD[2][0]), "bwd_h": K._entry(K._BWD_H[2][0]), "bwd_w": K._entry(K._BWD_W[2][0]),
            "atomic": K._entry(K._BWD_FUSED[2][0])}


def model(n: int, h: int, v: int, dtype: str = "bf16", gpu: str = "h100") -> Dict[str, dict]:
    """``{path: {"kernels": [...], "time_s": ..., "x_floor": ...}}`` for every GPU backend path."""
    import torch

    from fdiv_kernels.kernels import chunk_sizes

    g = GPUS[gpu]
    s = ELEM[dtype]
    tdt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    paths: Dict[str, Tuple[List[Kernel], str]] = {
        "gemm floor": (gemm_floor(n, h, v, s), "3 bare GEMMs"),
        "cuda": (one_pass(n, h, v, s, chunk_sizes.gpu_chunk_tokens(v, h, tdt), True),
                 f"one pass, {chunk_sizes.gpu_chunk_tokens(v, h, tdt)}-row chunks"),
        "triton": (one_pass(n, h, v, s, chunk_sizes.gpu_chunk_tokens(v, h, tdt), True),
                   f"one pass, {chunk_sizes.gpu_chunk_tokens(v, h, tdt)}-row chunks"),
        "cuda (two-pass)": (cuda_two_pass(n, h, v, s, chunk_sizes.cuda_two_pass_rows(v)),
                            f"token_stats path, {chunk_sizes.cuda_two_pass_rows(v)}-row chunks"),
    }
    try:
        cfg = triton_configs()
    except Exception as exc:  # pragma: no cover - triton not importable
        cfg = None
        print(f"costmodel: triton tables unavailable ({exc}); triton flash rows skipped")
    if cfg is not None:
        paths["triton-flash (two-pass)"] = (triton_flash(n, h, v, s, g, cfg, atomic=False), "deterministic backward")
        paths["triton-flash-atomic (two-pass)"] = (triton_flash(n, h, v, s, g, cfg, atomic=True), "atomics backward")
    floor_t = sum(k.time(g) for k in paths["gemm floor"][0])
    out = {}
    for name, (kernels, note) in paths.items():
        t = sum(k.time(g) for k in kernels)
        out[name] = {"kernels": kernels, "time_s": t, "x_floor": t / floor_t, "note": note}
    return out


def rank(n: int = 8192, h: int = 4096, v: int = 128256, dtype: str = "bf16", gpu: str = "h100") -> List[str]:
    """GPU backends (their default path) fastest first by the model (``backend="auto"`` order)."""
    m = model(n, h, v, dtype, gpu)
    return sorted((b for b in ("cuda", "triton") if b in m), key=lambda b: m[b]["time_s"])


def render(n: int, h: int, v: int, dtype: str, gpu: str) -> str:
    g = GPUS[gpu]
    m = model(n, h, v, dtype, gpu)
    lines = [f"Cost model (estimate, not a measurement): N={n}, H={h}, V={v}, {dtype}, {g['note']}.", "",
             "| path | kernel | calls | GFLOP | GB read | GB written | roofline ms |", "|---|---|---|---|---|---|---|"]
    for name, r in m.items():
        for k in r["kernels"]:
            lines.append(f"| {name} | {k.name} | {k.calls} | {k.flops / 1e9:.0f} | {k.read / 1e9:.2f} | "
                         f"{k.write / 1e9:.2f} | {k.time(g) * 1e3:.2f} |")
    lines += ["", "| path | | modelled ms | x GEMM floor |", "|---|---|---|---|"]
    for name, r in m.items():
        lines.append(f"| {name} | {r['note']} | {r['time_s'] * 1e3:.1f} | {r['x_floor']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="8192,4096,128256", help="N,H,V")
    ap.add_argument("--dtype", default="bf16", choices=sorted(ELEM))
    ap.add_argument("--gpu", default="h100", choices=sorted(GPUS))
    a = ap.parse_args(argv)
    n, h, v = (int(x) for x in a.shape.split(","))
    print(render(n, h, v, a.dtype, a.gpu))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
