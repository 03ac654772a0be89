"""CPU benchmark of the fused LM-head primitive: naive full logits vs the "torch" and "cpu" backends.

Standalone script (not pytest). Every (shape, implementation, mode) case runs in a fresh
subprocess, so peak memory is that case's own: peak RSS during the first run (VmHWM, reset
through /proc/self/clear_refs once the inputs exist) minus the RSS right before it, so memory that
the allocator keeps cached from earlier runs cannot hide a peak. Time is the median over --reps
runs after that first (warm-up) run; the CPU time (process_time, all threads) is reported too,
as it is less disturbed than wall time when other jobs share the cores.

    .venv/bin/python bench/bench_cpu_backend.py                       # shapes A and B, table to stdout
    .venv/bin/python bench/bench_cpu_backend.py --out bench/results/$(date +%F)-cpu-backend.md
    .venv/bin/python bench/bench_cpu_backend.py --shapes S --impls torch,cpu,cpu:4194304 --reps 2
    .venv/bin/python bench/bench_cpu_backend.py --threads 1   # one core per case: steadier on a shared machine

Implementations: ``naive`` (h @ W.T materialised, logsumexp/gather by eager torch autograd),
``torch`` (fk.token_stats backend="torch"), ``cpu`` (backend="cpu"), ``cpu:<elements>`` (the cpu
backend with ``chunk_sizes.TWO_PASS_ELEMENTS = <elements>`` logits per tile). Modes: ``fwd`` (no grad) and ``fwd+bwd``
(loss = mean(-logp) + 0.01 mean(lse^2) over supervised tokens, backward to hidden and weight).
Shapes (10% of labels ignored, fp32): A = 4096 x 1024 x 32000, B = 8192 x 256 x 32000,
S = 1024 x 512 x 32000 (quick).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import _status_kib as _rss_kib, reset_peak_rss as _reset_peak

SHAPES = {"A": (4096, 1024, 32000), "B": (8192, 256, 32000), "S": (1024, 512, 32000)}
MODES = ("fwd", "fwd+bwd")


# ------------------------------------------------------------------------------------------------
# child: one case
# ------------------------------------------------------------------------------------------------

def _child(args) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    import fdiv_kernels as fk

    n, h, v = SHAPES[args.shape]
    torch.manual_seed(0)
    hidden = torch.randn(n, h, requires_grad=True)
    weight = (torch.randn(v, h) / h ** 0.5).requires_grad_()
    labels = torch.randint(0, v, (n,))
    labels[torch.rand(n) < 0.1] = -100
    mask = labels != -100
    count = mask.sum()
    impl = args.impl.split(":")[0]

    def stats():
        if impl == "naive":
            z = hidden @ weight.T
            lse = torch.logsumexp(z, -1)
            logp = z.gather(1, labels.clamp(min=0)[:, None]).squeeze(1) - lse
            return torch.where(mask, logp, 0.0), torch.where(mask, lse, 0.0)
        out = fk.token_stats(hidden, weight, labels, backend=impl)
        return out.logp, out.lse

    def run():
        hidden.grad = weight.grad = None
        if args.mode == "fwd":
            with torch.no_grad():
                stats()
        else:
            logp, lse = stats()
            loss = -logp.sum() / count + 0.01 * (lse * lse).sum() / count
            loss.backward()

    if impl == "cpu":
        from fdiv_kernels.kernels import chunk_sizes, native
        if ":" in args.impl:  # cpu:<elements>: the two-pass tile size
            chunk_sizes.TWO_PASS_ELEMENTS = int(args.impl.split(":")[1])
        native.load("cpu")  # load the extension before the memory baseline
    hidden.grad = weight.grad = None
    peak_ok = _reset_peak()
    base = _rss_kib("VmRSS")
    run()  # first run: peak memory (nothing cached from earlier runs), and the warm-up
    peak = _rss_kib("VmHWM")
    times, cpu_times = [], []
    for _ in range(args.reps):
        t0, c0 = time.perf_counter(), time.process_time()
        run()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    print(json.dumps(dict(times=times, cpu_times=cpu_times, peak_extra_mib=(peak - base) / 1024, peak_reset=peak_ok,
                          threads=torch.get_num_threads())))


# ------------------------------------------------------------------------------------------------
# parent: all cases, table, report
# ------------------------------------------------------------------------------------------------

def _run_case(shape, impl, mode, reps, threads) -> dict:
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--shape", shape, "--impl", impl, "--mode", mode,
           "--reps", str(reps), "--threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"case {shape}/{impl}/{mode} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _machine(threads: int) -> list:
    import torch

    lines = []
    try:
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor()
    blas = [line.strip().lstrip("- ") for line in torch.__config__.show().splitlines()
            if "Math Kernel" in line or "OpenBLAS" in line]
    gcc = subprocess.run(["c++", "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    lines.append(f"- CPU: {model}, {os.cpu_count()} logical cores; torch threads per case: {threads or torch.get_num_threads()}")
    lines.append(f"- python {platform.python_version()}, torch {torch.__version__}, {blas[0] if blas else 'BLAS ?'}")
    lines.append(f"- compiler: {gcc[0] if gcc else '?'}; OS: {platform.platform()}")
    return lines


def _fmt_table(rows) -> list:
    out = ["| shape | mode | implementation | median time (s) | min (s) | CPU time (s) | time vs naive "
           "| time vs torch backend | peak extra RSS (MiB) | memory vs naive | memory vs torch backend |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['shape']} | {r['mode']} | {r['impl']} | {r['median']:.3f} | {r['min']:.3f} | {r['cpu']:.2f} | "
                   f"{r['rel_naive_t']:.2f} | {r['rel_torch_t']:.2f} | {r['mem']:.0f} | {r['rel_naive_m']:.2f} | "
                   f"{r['rel_torch_m']:.2f} |")
    return out


def _parent(args) -> None:
    impls = args.impls.split(",")
    shapes = args.shapes.split(",")
    started = _dt.datetime.now(_dt.timezone.utc)
    load0 = os.getloadavg()
    results = []
    for shape in shapes:
        for mode in MODES:
            case = {}
            for impl in impls:
                r = _run_case(shape, impl, mode, args.reps, args.threads)
                case[impl] = r
                print(f"{shape} {mode:8s} {impl:12s} median {statistics.median(r['times']):.3f} s  "
                      f"min {min(r['times']):.3f} s  cpu {statistics.median(r['cpu_times']):.2f} s  peak +{r['peak_extra_mib']:.0f} MiB  "
                      f"(load {os.getloadavg()[0]:.1f})", file=sys.stderr, flush=True)
            for impl, r in case.items():
                med = statistics.median(r["times"])
                base_n = case.get("naive")
                base_t = case.get("torch")
                rel = lambda x, b, key: (x / b) if b else float("nan")  # noqa: E731
                results.append(dict(
                    shape=f"{shape} {SHAPES[shape]}", mode=mode, impl=impl, median=med, min=min(r["times"]),
                    cpu=statistics.median(r["cpu_times"]),
                    mem=r["peak_extra_mib"],
                    rel_naive_t=rel(med, statistics.median(base_n["times"]) if base_n else 0, "t"),
                    rel_torch_t=rel(med, statistics.median(base_t["times"]) if base_t else 0, "t"),
                    rel_naive_m=rel(r["peak_extra_mib"], base_n["peak_extra_mib"] if base_n else 0, "m"),
                    rel_torch_m=rel(r["peak_extra_mib"], base_t["peak_extra_mib"] if base_t else 0, "m"),
                ))
    load1 = os.getloadavg()
    table = _fmt_table(results)
    print("\n".join(table))
    if args.out:
        cmd = " ".join([os.path.relpath(sys.executable)] + [os.path.relpath(__file__)] + sys.argv[1:])
        doc = [f"# CPU backend benchmark ({started:%Y-%m-%d %H:%M} UTC)", "",
               f"Command: `{cmd}`", "",
               *_machine(args.threads),
               f"- load average (1/5/15 min) at start {load0[0]:.1f}/{load0[1]:.1f}/{load0[2]:.1f}, "
               f"at end {load1[0]:.1f}/{load1[1]:.1f}/{load1[2]:.1f}"
               + (" -- other jobs shared the cores, so times are noisy" if max(load0[0], load1[0]) > 2.5 else ""),
               "", f"fp32, 10% of labels ignored, {args.reps} timed runs after one warm-up, each case in a fresh "
               "subprocess; peak extra RSS = VmHWM during the first (warm-up) run minus VmRSS before it. "
               "The weight gradient (V x H fp32) is part of every fwd+bwd peak.", "",
               *table, ""]
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write("\n".join(doc))
        print(f"wrote {args.out}", file=sys.stderr)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="A,B", help="comma list of A, B, S")
    p.add_argument("--impls", default="naive,torch,cpu", help="comma list of naive, torch, cpu, cpu:<elements>")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="intra-op threads per case (0: torch's default)")
    p.add_argument("--out", default=None, help="write a markdown report here")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--shape", help=argparse.SUPPRESS)
    p.add_argument("--impl", help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    args = p.parse_args()
    _child(args) if args.child else _parent(args)


if __name__ == "__main__":
    main()
