"""Ratios of the ``ce`` implementations measured in ONE process, sides alternated round by round.

    python -m bench.side_by_side [--shapes B/4,A/4] [--dtypes bf16,fp32] [--impls naive,cce,gemm,fk[cpu],fk[torch]]
                                 [--rounds 5] [--threads N] [--mem] [--out bench/results/<date>-side-by-side.md]

For each shape x dtype: the ``ce`` suite's inputs and implementations (bench/impls.py, forward +
backward, the same code as ``make bench``), one warm-up call each, then ``rounds`` rounds in which
every implementation runs once, in a rotated order (so that a burst of load from another process
hits every side alike). Reports the median and the minimum wall time per implementation and their
ratio to ``naive`` and to ``gemm`` (the three bare GEMMs). ``--threads 1`` times the process's CPU time
(``time.process_time``) on one thread: what each side costs, least disturbed by other processes on
a shared machine (which stall multi-threaded code at every barrier). ``--mem`` adds each one's peak memory
above the inputs, measured in this process after the timing (bench/common.measure_peak: the cpu
backend's workspace is released first, so it counts).

On a shared machine compare the ratios of one run, never absolute times across runs.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time

import torch

from .common import Case, clear_grads, make_inputs, measure_peak, provenance, tune_glibc_malloc
from .impls import get_impl, runner

SHAPES = {"B/4": (2048, 256, 32000), "A/4": (1024, 1024, 32000)}


def _calls(shape: str, dtype: str, impls):
    n, h, v = SHAPES[shape]
    out = {}
    for name in impls:
        case = Case("ce", name, "fwdbwd", n, h, v, dtype)
        impl = get_impl(case)
        ok, why = impl.available("cpu")
        if not ok:
            print(f"  {name}: skipped ({why})", file=sys.stderr)
            continue
        x = make_inputs(case)
        out[name] = (runner(impl, case, x), x)
    return out


def measure(shape: str, dtype: str, impls, rounds: int, mem: bool) -> dict:
    clock = time.process_time if torch.get_num_threads() == 1 else time.perf_counter
    calls = _calls(shape, dtype, impls)
    for name, (fn, x) in calls.items():  # warm-up (compiles, lazy init)
        fn()
        clear_grads(x)
    times = {name: [] for name in calls}
    names = list(calls)
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            fn, x = calls[name]
            clear_grads(x)
            gc.collect()
            t0 = clock()
            fn()
            times[name].append(clock() - t0)
            clear_grads(x)
    res = {}
    for name in names:
        res[name] = {"median": statistics.median(times[name]), "min": min(times[name])}
    if mem:
        for name in names:
            fn, x = calls[name]
            clear_grads(x)
            res[name]["peak_mib"] = measure_peak(fn, torch.device("cpu"))["peak_mib"]
            clear_grads(x)
    return res


def table(shape: str, dtype: str, res: dict) -> str:
    n, h, v = SHAPES[shape]
    lines = [f"### {shape} {n} x {h} x {v} {dtype}, forward + backward", "",
             "| implementation | median | min | median / naive | min / naive | median / gemm | peak MiB | mem / naive |",
             "|---|---|---|---|---|---|---|---|"]
    base = res.get("naive")
    floor = res.get("gemm")
    for name, r in sorted(res.items(), key=lambda kv: kv[1]["median"]):
        def ratio(ref, key):
            return f"{r[key] / ref[key]:.2f}" if ref else "-"
        pk = r.get("peak_mib")
        mem_ratio = f"{pk / base['peak_mib']:.2f}" if (pk is not None and base and base.get("peak_mib")) else "-"
        lines.append(f"| `{name}` | {r['median']:.3f} s | {r['min']:.3f} s | {ratio(base, 'median')} | "
                     f"{ratio(base, 'min')} | {ratio(floor, 'median')} | "
                     f"{'-' if pk is None else f'{pk:.0f}'} | {mem_ratio} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="B/4,A/4")
    ap.add_argument("--dtypes", default="bf16,fp32")
    ap.add_argument("--impls", default="naive,cce,gemm,fk[cpu],fk[torch]")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    ap.add_argument("--mem", action="store_true")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    tune_glibc_malloc()
    if a.threads:
        torch.set_num_threads(a.threads)
    impls = a.impls.split(",")
    load0 = os.getloadavg()[0]
    parts = []
    for shape in a.shapes.split(","):
        for dtype in a.dtypes.split(","):
            res = measure(shape, dtype, impls, a.rounds, a.mem)
            t = table(shape, dtype, res)
            print(t + "\n", flush=True)
            parts.append(t)
    prov = provenance(torch.device("cpu"), "python -m bench.side_by_side " + " ".join(argv or sys.argv[1:]))
    head = (f"{prov['device']}, torch {prov['versions']['torch']}, commit {prov['git_commit']}, "
            f"{prov['date_utc']}; load average {load0:.2f} at the start, {os.getloadavg()[0]:.2f} at the end; "
            f"{a.rounds} alternated rounds, " + ("process CPU time, 1 thread" if torch.get_num_threads() == 1
                                                 else f"wall time, {torch.get_num_threads()} threads"))
    print(head)
    if a.out:
        with open(a.out, "w") as f:
            f.write("# Side-by-side ratios (`python -m bench.side_by_side`)\n\n" + head + "\n\n" + "\n\n".join(parts) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
