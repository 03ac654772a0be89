"""A vocabulary-parallel fused loss: its communication per call, and its time against one process.

    python -m bench.vocab_parallel                                   # 2 gloo ranks, 2048 x 512 x 32000, kl
    python -m bench.vocab_parallel --world 3 --n 512 --reps 3 --backend torch

Spawns ``--world`` gloo processes on this machine (CPU), each holding ``V / world`` rows of the
head (``vocab_group=``), and counts every ``torch.distributed`` collective one ``fk.loss`` forward
+ backward issues (calls, bytes and the time rank 0 spends in them, per kind), as docs/performance.md ("Vocabulary parallelism")
quotes. Then the median step time (``--reps``) of the sharded call against this process holding
the whole head (``torch`` threads split evenly between the ranks; the whole head gets them all).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time
from collections import defaultdict

import torch
import torch.multiprocessing as mp

import fdiv_kernels as fk


def _inputs(args):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(args.n, args.h, generator=g)
    weight = torch.randn(args.v, args.h, generator=g) * 0.02
    labels = torch.randint(0, args.v, (args.n,), generator=g)
    return hidden, weight, labels


def _step(hidden, weight, labels, args, **kw):
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    out = fk.loss(h, w, labels, divergence=args.divergence, backend=args.backend,
                  return_entropy=args.entropy, **kw)
    loss = out.loss + (0.1 * out.entropy.mean() if args.entropy else 0)
    loss.backward()
    return loss


def _timed(fn, reps):
    fn()  # warm up (and build the extension)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _counting():
    """Wrap the collectives: ``{kind: [calls, bytes, seconds]}`` of what runs while counting."""
    import torch.distributed as dist

    counts = defaultdict(lambda: [0, 0, 0.0])
    for name in ("all_reduce", "all_gather", "broadcast", "all_gather_into_tensor", "reduce_scatter_tensor"):
        orig = getattr(dist, name)

        def wrapped(*a, _orig=orig, _name=name, **k):
            t = a[0] if isinstance(a[0], torch.Tensor) else a[1]
            op = f" {str(k['op']).rsplit('.', 1)[-1]}" if "op" in k else ""
            kind = f"{_name}{op} {list(t.shape)} {str(t.dtype).replace('torch.', '')}"
            counts[kind][0] += 1
            counts[kind][1] += t.numel() * t.element_size()
            start = time.perf_counter()
            try:
                return _orig(*a, **k)
            finally:
                counts[kind][2] += time.perf_counter() - start
        setattr(dist, name, wrapped)
    return counts


def _worker(rank, args, port, threads, out):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", rank=rank, world_size=args.world)
    hidden, weight, labels = _inputs(args)
    rows = weight.tensor_split(args.world)[rank]
    step = lambda: _step(hidden, rows, labels, args, vocab_group=dist.group.WORLD)  # noqa: E731
    step()
    counts = _counting()
    step()
    counted = {k: tuple(v) for k, v in counts.items()}
    median = _timed(step, args.reps)
    if rank == 0:
        torch.save({"counts": counted, "median": median, "rows": rows.shape[0]}, out)
    dist.destroy_process_group()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--h", type=int, default=512)
    ap.add_argument("--v", type=int, default=32000)
    ap.add_argument("--divergence", default="kl")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--entropy", action="store_true", help="return_entropy=True and a term on it")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args(argv)
    threads = max(1, torch.get_num_threads() // args.world)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = f"/tmp/bench_vocab_parallel_{os.getpid()}.pt"
    mp.start_processes(_worker, args=(args, port, threads, out), nprocs=args.world, join=True, start_method="spawn")
    res = torch.load(out)
    os.remove(out)
    whole = _timed(lambda: _step(*_inputs(args), args), args.reps)
    print(f"{args.n} x {args.h} x {args.v}, {args.divergence}{' + entropy' if args.entropy else ''}, "
          f"backend {args.backend}, {args.world} gloo ranks ({threads} threads each), shard of {res['rows']} rows")
    print("| collective (one rank's tensor) | calls per fk.loss fwd + bwd | bytes in all | ms in all (rank 0) |")
    print("|---|---|---|---|")
    for kind, (calls, size, secs) in sorted(res["counts"].items()):
        print(f"| {kind} | {calls} | {size} | {secs * 1e3:.1f} |")
    print(f"step: {res['median'] * 1e3:.1f} ms on {args.world} ranks, {whole * 1e3:.1f} ms in one process "
          f"({torch.get_num_threads()} threads); median of {args.reps}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
