"""Eager vs ``torch.compile(fullgraph=True)`` of one fused-loss training step, in one process.

    python -m bench.compile_step                        # 2048 x 512 x 32000, fp32, backend auto
    python -m bench.compile_step --n 512 --reps 3       # quicker

Prints the first-call (compile) time of each compiler backend and the step-time ratio
compiled / eager, the two sides alternating (median of ``--reps`` each), as docs/performance.md
quotes. The step is ``fk.loss(h, W, y, divergence=...).loss`` (compiled) + ``backward()`` on leaf tensors.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import fdiv_kernels as fk


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--h", type=int, default=512)
    ap.add_argument("--v", type=int, default=32000)
    ap.add_argument("--divergence", default="sft")
    ap.add_argument("--backend", default="auto", help="fk backend (auto, cpu, torch)")
    ap.add_argument("--compilers", default="aot_eager,inductor")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args(argv)

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(args.n, args.h, generator=g).requires_grad_()
    weight = (torch.randn(args.v, args.h, generator=g) * 0.02).requires_grad_()
    labels = torch.randint(0, args.v, (args.n,), generator=g)

    def loss_fn(h, w, y):
        return fk.loss(h, w, y, divergence=args.divergence, backend=args.backend).loss

    def timed(fn):
        hidden.grad = weight.grad = None
        t0 = time.perf_counter()
        fn(hidden, weight, labels).backward()
        return time.perf_counter() - t0

    sides = {"eager": loss_fn}
    for name in args.compilers.split(","):
        compiled = torch.compile(loss_fn, fullgraph=True, backend=name)
        first = timed(compiled)
        sides[name] = compiled
        print(f"{name}: first call (compile + one step) {first:.1f} s")
    timed(loss_fn)  # warm-up
    times = {k: [] for k in sides}
    for _ in range(args.reps):  # alternate the sides
        for k, fn in sides.items():
            times[k].append(timed(fn))
    eager = statistics.median(times["eager"])
    print(f"shape {args.n}x{args.h}x{args.v}, divergence={args.divergence}, backend={args.backend}, "
          f"threads={torch.get_num_threads()}, reps={args.reps}")
    for k, ts in times.items():
        med = statistics.median(ts)
        print(f"{k:>10}: median step {med:.3f} s  ratio to eager {med / eager:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
