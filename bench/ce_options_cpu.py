"""The cost of ``fk.loss``'s cross-entropy options and token accuracy on the cpu backend (issue 25),
ratios measured in one process:

    python -m bench.ce_options_cpu [--shape 2048 256 32000] [--rounds 9] [--threads 1]

``fk.loss`` forward + backward (``backend="cpu"``, fp32, every 7th label ignored) with the options
off, ``label_smoothing=0.1``, ``class_weight`` (random ``[V]``), both, and ``return_token_accuracy``,
alternated round by round (round 0 warms up); the minimum wall time of each and its ratio to "off".
"""

from __future__ import annotations

import argparse
import time

import torch

import fdiv_kernels as fk


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=int, nargs=3, default=(2048, 256, 32000), metavar=("N", "H", "V"))
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    n, h, v = args.shape
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, h, generator=g).requires_grad_()
    weight = (torch.randn(v, h, generator=g) * h ** -0.5).requires_grad_()
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::7] = -100
    cw = torch.rand(v, generator=g)
    configs = {"off": {}, "label_smoothing=0.1": {"label_smoothing": 0.1}, "class_weight": {"class_weight": cw},
               "both": {"label_smoothing": 0.1, "class_weight": cw},
               "return_token_accuracy": {"return_token_accuracy": True}}
    best = dict.fromkeys(configs, float("inf"))
    for r in range(args.rounds + 1):
        for name, kw in configs.items():
            hidden.grad = weight.grad = None
            t0 = time.perf_counter()
            fk.loss(hidden, weight, labels, backend="cpu", **kw).loss.backward()
            if r:
                best[name] = min(best[name], time.perf_counter() - t0)
    print(f"N={n} H={h} V={v} fp32, cpu backend, {args.threads} thread(s), min of {args.rounds} interleaved rounds "
          f"(forward + backward):")
    for name, t in best.items():
        print(f"  {name:22s} {t * 1e3:8.1f} ms  {100 * (t / best['off'] - 1):+5.2f}%")


if __name__ == "__main__":
    main()
