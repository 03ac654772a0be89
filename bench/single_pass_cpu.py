"""The CPU acceptance measurements of the single pass (issue 13), ratios measured in one process.

    python -m bench.single_pass_cpu [--rounds 7] [--out bench/results/<date>-cpu-single-pass.md]

1. ``floor``: one thread, N=2048, H=512, V=32000 fp32: ``fk.loss`` forward + backward (backend
   ``cpu``) against the three bare GEMMs of the same shape (``h W^T``, ``G W``, ``G^T h`` into
   preallocated outputs), alternated round by round; sft, js, kl at token level, pearson at sequence
   level (8 rows of 256), with reference log-probs where the loss has one. Ratio of medians of
   process CPU time (``time.process_time``: what this process got of a shared core), and of minima.
2. ``naive``: default threads, 8192 x 256 x 32000 fp32, 10% of labels ignored: ``backend="cpu"``
   forward + backward against naive torch (full logits, float32 log-softmax, gather), alternated;
   wall time (two threads); the extra peak memory of each in a fresh interpreter
   (``VmHWM - VmRSS`` after one warm-up call, as ``bench/memprobe.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from .common import provenance

FLOOR_SHAPE = (2048, 512, 32000)
NAIVE_SHAPE = (8192, 256, 32000)
FLOOR_CASES = {
    "sft (token)": dict(divergence="sft"),
    "js (token)": dict(divergence="js", beta=0.1, ref=True),
    "kl (token)": dict(divergence="kl", beta=0.1, ref=True),
    "pearson (sequence)": dict(divergence="pearson", beta=0.1, ref=True, level="sequence"),
}


def _floor_inputs():
    n, h, v = FLOOR_SHAPE
    g = torch.Generator().manual_seed(0)
    hid = (torch.randn(n, h, generator=g) * 0.5).requires_grad_()
    w = (torch.randn(v, h, generator=g) * 0.05).requires_grad_()
    y = torch.randint(0, v, (n,), generator=g)
    ref = -torch.rand(n, generator=g) * 5
    return hid, w, y, ref


def measure_floor(rounds: int) -> list:
    import fdiv_kernels as fk

    torch.set_num_threads(1)
    hid, w, y, ref = _floor_inputs()
    n, h, v = FLOOR_SHAPE
    grad = torch.randn(n, v) * 1e-3
    outs = (torch.empty(n, v), torch.empty(n, h), torch.empty(v, h))

    def floor():
        torch.mm(hid.detach(), w.detach().T, out=outs[0])
        torch.mm(grad, w.detach(), out=outs[1])
        torch.mm(grad.T, hid.detach(), out=outs[2])

    rows = []
    for name, case in FLOOR_CASES.items():
        kw = {k: val for k, val in case.items() if k != "ref"}
        seq = case.get("level") == "sequence"
        hh, yy = (hid.view(8, n // 8, h), y.view(8, n // 8)) if seq else (hid, y)
        rr = (ref.view(8, n // 8) if seq else ref) if case.get("ref") else None

        def loss():
            hid.grad = w.grad = None
            fk.loss(hh, w, yy, ref_logp=rr, backend="cpu", **kw).loss.backward()

        loss(), floor()  # warm-up (extension load, allocator, MKL)
        tf, tl = [], []
        for _ in range(rounds):
            t0 = time.process_time()
            floor()
            tf.append(time.process_time() - t0)
            t0 = time.process_time()
            loss()
            tl.append(time.process_time() - t0)
        rows.append({"case": name, "floor_s": statistics.median(tf), "fk_s": statistics.median(tl),
                     "ratio_median": statistics.median(tl) / statistics.median(tf), "ratio_min": min(tl) / min(tf)})
        print(f"floor {name}: {rows[-1]['ratio_median']:.3f}x (min {rows[-1]['ratio_min']:.3f}x)", flush=True)
    return rows


def _naive_inputs():
    n, h, v = NAIVE_SHAPE
    g = torch.Generator().manual_seed(0)
    hid = torch.randn(n, h, generator=g).requires_grad_()
    w = (torch.randn(v, h, generator=g) * (2.0 / h ** 0.5)).requires_grad_()
    y = torch.randint(0, v, (n,), generator=g)
    y[torch.rand(n, generator=g) < 0.1] = -100
    return hid, w, y


def _naive_step(kind: str, hid, w, y):
    import fdiv_kernels as fk

    from .impls import naive_ce

    hid.grad = w.grad = None
    loss = naive_ce(hid, w, y) if kind == "naive" else fk.loss(hid, w, y, backend="cpu").loss
    loss.backward()


def _peak_in_fresh_process(kind: str) -> float:
    code = ("import json, torch; from bench.single_pass_cpu import _naive_inputs, _naive_step; "
            "from bench.common import measure_peak; x = _naive_inputs(); "
            f"_naive_step({kind!r}, *x); x[0].grad = x[1].grad = None; "
            f"print('PEAK', json.dumps(measure_peak(lambda: _naive_step({kind!r}, *x), torch.device('cpu'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parent.parent, env=dict(os.environ))
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("PEAK ")][-1]
    return json.loads(line[5:])["peak_mib"]


def measure_naive(rounds: int) -> dict:
    hid, w, y = _naive_inputs()
    for k in ("naive", "cpu"):
        _naive_step(k, hid, w, y)
    tn, tc = [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        _naive_step("naive", hid, w, y)
        tn.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        _naive_step("cpu", hid, w, y)
        tc.append(time.perf_counter() - t0)
    peak_naive, peak_cpu = _peak_in_fresh_process("naive"), _peak_in_fresh_process("cpu")
    row = {"threads": torch.get_num_threads(), "naive_s": statistics.median(tn), "cpu_s": statistics.median(tc),
           "time_ratio_median": statistics.median(tc) / statistics.median(tn), "time_ratio_min": min(tc) / min(tn),
           "peak_naive_mib": peak_naive, "peak_cpu_mib": peak_cpu, "memory_ratio": peak_cpu / peak_naive}
    print(f"naive: time {row['time_ratio_median']:.3f}x (min {row['time_ratio_min']:.3f}x), "
          f"peak {peak_cpu:.0f} / {peak_naive:.0f} MiB = {row['memory_ratio']:.3f}x", flush=True)
    return row


def render(floor: list, naive: dict, prov: dict, command: str) -> str:
    md = ["# Single pass on CPU (issue 13 acceptance)", "",
          f"- command: `{command}`; date {prov['date_utc']}; commit `{prov['git_commit']}`",
          f"- machine: {prov['cpu_model']}, {prov['cpu_count']} cores; load average at start "
          f"{prov['loadavg']}; torch {torch.__version__}", "", prov["note"], "",
          "## fk.loss forward + backward / three bare GEMMs (one thread, 2048 x 512 x 32000 fp32)", "",
          "Process CPU time, the two sides alternated round by round; target <= 1.05.", "",
          "| loss | 3 GEMMs (s) | fk.loss (s) | ratio of medians | ratio of minima |", "|---|---|---|---|---|"]
    md += [f"| {r['case']} | {r['floor_s']:.3f} | {r['fk_s']:.3f} | {r['ratio_median']:.3f} | {r['ratio_min']:.3f} |"
           for r in floor]
    md += ["", f"## backend=\"cpu\" / naive torch ({naive['threads']} threads, 8192 x 256 x 32000 fp32, 10% ignored)", "",
           "Wall time alternated; extra peak memory in a fresh interpreter each. Targets: time <= 0.66, "
           "memory <= 0.10.", "",
           "| | naive | cpu | ratio |", "|---|---|---|---|",
           f"| time (median s) | {naive['naive_s']:.3f} | {naive['cpu_s']:.3f} | {naive['time_ratio_median']:.3f} "
           f"(min {naive['time_ratio_min']:.3f}) |",
           f"| extra peak memory (MiB) | {naive['peak_naive_mib']:.0f} | {naive['peak_cpu_mib']:.0f} | "
           f"{naive['memory_ratio']:.3f} |", ""]
    return "\n".join(md)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--out", default=f"bench/results/{time.strftime('%Y-%m-%d')}-cpu-single-pass.md")
    a = ap.parse_args(argv)
    command = "python -m bench.single_pass_cpu " + " ".join(argv if argv is not None else sys.argv[1:])
    prov = provenance(torch.device("cpu"), command)
    prov["loadavg"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    threads = torch.get_num_threads()
    floor = measure_floor(a.rounds)
    torch.set_num_threads(threads)
    naive = measure_naive(max(3, a.rounds // 2))
    Path(a.out).write_text(render(floor, naive, prov, command))
    Path(a.out).with_suffix(".json").write_text(json.dumps({"provenance": prov, "floor": floor, "naive": naive},
                                                           indent=1, default=str) + "\n")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
