"""The headline benchmark of ``make gpu-check``: one shape, fwd+bwd, every implementation, fast.

    python -m bench.headline --shape llama --rounds 3 --out results.jsonl --deadline 100

Runs, for one shape of ``SHAPES`` (bf16, the GPU profile's ce shapes), the ``ce`` suite's
implementations in the order of ``ORDER``: a warm-up call that is also the correctness check against float32 naive torch
(``bench.harness.check_loss``), then ``rounds`` timed calls (``torch.cuda.synchronize`` around
each; min and median), the peak memory above the inputs of the first timed call
(``torch.cuda.max_memory_allocated``), and for the ``fk[...]`` rows a per-kernel breakdown of one
more call under ``torch.profiler`` (CUDA time per kernel name, top ``--top``). One JSON line per
implementation is appended to ``--out`` as soon as it is measured, so a step killed at its budget
keeps what it finished; an implementation that would start after ``--deadline`` seconds is
recorded as skipped. Unavailable peers (no liger/cut-cross-entropy wheel) are recorded with the
reason. Summaries: ``scripts/gpu_check.py`` (``time / naive``, ``x GEMM floor``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from typing import Dict, List

import torch

from .common import MIB, Case, clear_grads, make_inputs, sync
from .harness import check_loss
from .impls import ce_impls, runner
from .shapes import PROFILES

SHAPES = {"llama": PROFILES["gpu"]["ce"][0], "gemma": PROFILES["gpu"]["ce"][1],
          "tiny": PROFILES["tiny"]["ce"][0]}  # tiny: for the CPU smoke test of this module (--device cpu)
ORDER = ("gemm", "naive", "fk[cuda]", "fk[triton]", "fk[triton-flash]", "fk[triton-flash-atomic]", "liger", "cce",
         "fk[torch]", "naive+compile")
"""The floor and naive first (every ratio needs them), the reference fk[torch] late, torch.compile
last (it compiles longest, so it is the one a step deadline drops first)."""


def kernel_breakdown(call, top: int, device: torch.device) -> List[Dict[str, object]]:
    """CUDA time per kernel name over one ``call()`` (torch.profiler), largest first (on CPU:
    self CPU time per operator, for the smoke test)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA if device.type == "cuda" else ProfilerActivity.CPU]) as prof:
        call()
        sync(device)
    rows = []
    for ev in prof.key_averages():
        if device.type == "cuda":
            t = getattr(ev, "device_time_total", None)
            if t is None:
                t = getattr(ev, "cuda_time_total", 0)
        else:
            t = ev.self_cpu_time_total
        if t > 0:
            rows.append({"kernel": ev.key[:160], "ms": t / 1e3, "calls": ev.count})
    rows.sort(key=lambda r: -r["ms"])
    total = sum(r["ms"] for r in rows)
    return [dict(r, share=r["ms"] / total if total else 0.0) for r in rows[:top]]


def measure(impl, case: Case, inputs, rounds: int, top: int) -> Dict[str, object]:
    """Warm-up + check, timed rounds, peak memory (CUDA), kernel breakdown (fk rows) for one impl."""
    device = torch.device(case.device)
    cuda = device.type == "cuda"
    run = runner(impl, case, inputs)
    t0 = time.perf_counter()
    out = run()
    sync(device)
    row: Dict[str, object] = {"warmup_s": time.perf_counter() - t0, "peak_mib": None}
    row.update(check_loss(case, impl, out))
    del out
    times = []
    for i in range(rounds):
        clear_grads(inputs)
        sync(device)
        if i == 0 and cuda:
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        t0 = time.perf_counter()
        out = run()
        sync(device)
        times.append(time.perf_counter() - t0)
        if i == 0 and cuda:
            row["peak_mib"] = (torch.cuda.max_memory_allocated(device) - base) / MIB
        del out
    row.update(t_min=min(times), t_median=statistics.median(times), rounds=rounds)
    if impl.name.startswith("fk["):
        clear_grads(inputs)
        row["kernels"] = kernel_breakdown(run, top, device)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", required=True, help="JSON lines file (appended)")
    ap.add_argument("--deadline", type=float, default=math.inf, help="start no implementation after this many s")
    ap.add_argument("--top", type=int, default=8, help="kernels listed per fk backend")
    ap.add_argument("--impls", default=",".join(ORDER), help="comma-separated subset of " + ",".join(ORDER))
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: only for the smoke test")
    a = ap.parse_args(argv)
    start = time.perf_counter()
    if a.device == "cuda" and not torch.cuda.is_available():
        print("bench.headline: no CUDA device", file=sys.stderr)
        return 2
    label, n, h, v, dtype = SHAPES[a.shape][:5]
    probe = Case("ce", "", "fwdbwd", n, h, v, dtype, a.device)
    by_name = {i.name: i for i in ce_impls(a.device)}
    wanted = [name for name in a.impls.split(",") if name]
    inputs = None

    def emit(row):
        row.update(shape=a.shape, shape_label=label, n=n, h=h, v=v, dtype=dtype, mode="fwdbwd", device=a.device)
        with open(a.out, "a") as f:
            f.write(json.dumps(row, sort_keys=True) + "\n")
        status = row["status"] if row["status"] != "ok" else (
            f"{row['t_min'] * 1e3:.1f} ms, {row['peak_mib'] or 0:.0f} MiB, check {row['check']}")
        print(f"headline {a.shape} {row['impl']}: {status}", flush=True)

    for name in wanted:
        impl = by_name.get(name)
        if impl is None:
            emit({"impl": name, "status": "SKIPPED", "reason": "not registered here"})
            continue
        ok, why = impl.available(a.device)
        if not ok:
            emit({"impl": name, "label": impl.label, "status": "SKIPPED", "reason": why})
            continue
        if time.perf_counter() - start > a.deadline:
            emit({"impl": name, "label": impl.label, "status": "SKIPPED",
                  "reason": f"step deadline ({a.deadline:.0f} s) reached before it started"})
            continue
        if inputs is None:
            inputs = make_inputs(probe)
        case = Case("ce", name, "fwdbwd", n, h, v, dtype, a.device)
        try:
            row = measure(impl, case, inputs, a.rounds, a.top)
            row.update(impl=name, label=impl.label, status="ok")
        except Exception as exc:  # a failing implementation is a result, not the end
            row = {"impl": name, "label": impl.label, "status": "FAILED",
                   "reason": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"}
        clear_grads(inputs)
        if a.device == "cuda":
            torch.cuda.empty_cache()
        emit(row)
    return 0


if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)
    sys.exit(main())
