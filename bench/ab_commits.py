"""``fk.loss`` forward + backward of two checkouts of this package, timed side by side.

    git worktree add /tmp/before <commit>
    python -m bench.ab_commits --old /tmp/before --new . [--rounds 11] [--backend cpu]

Two persistent worker processes, one per checkout (``PYTHONPATH``; each its own JIT-extension cache
so the two C++ builds do not evict each other; kept under the temporary directory for the next run), one thread each. Every round runs each worker once,
in alternated order; a worker times, in its process CPU time, the three bare GEMMs of the shape
(the floor: ``z = h W^T``, ``grad_h = G W``, ``grad_W = G^T h``) and then ``fk.loss`` for sft, js and
kl (beta 0.1 with references). Reported: the medians, each side's median ratio to its own floor
(robust to load drifting between rounds) and the ratio of those ratios; ``--mem`` adds the peak
resident memory one call adds above its inputs, per checkout and case, each in a fresh process. Used for the before/after
table of docs/design.md (the layered core, issue 23).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

WORKER = r'''
import json, sys, time, torch
torch.set_num_threads(1)
import fdiv_kernels as fk
N, H, V, backend = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
g = torch.Generator().manual_seed(0)
h = torch.randn(N, H, generator=g).requires_grad_()
w = (torch.randn(V, H, generator=g) * 0.05).requires_grad_()
y = torch.randint(0, V, (N,), generator=g)
y[::10] = -100
ref = -torch.rand(N, generator=g) * 3
cases = {"sft": dict(divergence="sft"), "js": dict(divergence="js", beta=0.1, ref_logp=ref),
         "kl": dict(divergence="kl", beta=0.1, ref_logp=ref)}
def fk_step(kw, hidden=h, weight=w, labels=y):
    hidden.grad = weight.grad = None
    out = fk.loss(hidden, weight, labels, backend=backend, **kw)
    getattr(out, "loss", out).backward()  # older commits returned the loss itself
if sys.argv[5:]:  # memory mode: the peak RSS one call adds above its inputs (the extension loaded first)
    import resource
    fk_step({}, torch.randn(8, H, requires_grad=True), w.detach()[:64].clone().requires_grad_(),
            torch.zeros(8, dtype=torch.long))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fk_step(cases[sys.argv[5]])
    print(json.dumps((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024), flush=True)
    sys.exit(0)
G = torch.randn(N, V, generator=g)
zo, gh, gw = torch.empty(N, V), torch.empty(N, H), torch.empty(V, H)
def floor():
    torch.mm(h.detach(), w.detach().T, out=zo); torch.mm(G, w.detach(), out=gh); torch.mm(G.T, h.detach(), out=gw)
for kw in cases.values():
    fk_step(kw)
floor()
print("ready", flush=True)
for line in sys.stdin:
    out = {}
    t = time.process_time(); floor(); out["floor"] = time.process_time() - t
    for name, kw in cases.items():
        t = time.process_time(); fk_step(kw); out[name] = time.process_time() - t
    print(json.dumps(out), flush=True)
'''

CASES = ("sft", "js", "kl")


def start(path: str, ext: str, shape, backend: str) -> subprocess.Popen:
    """A worker importing ``fdiv_kernels`` from the checkout ``path``, ready for rounds."""
    env = dict(os.environ, PYTHONPATH=os.path.abspath(path), TORCH_EXTENSIONS_DIR=ext, OMP_NUM_THREADS="1")
    p = subprocess.Popen([sys.executable, "-c", WORKER, *map(str, shape), backend], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True, env=env, cwd=tempfile.gettempdir())
    if p.stdout.readline().strip() != "ready":
        raise SystemExit(f"the worker of {path} did not start (exit code {p.wait()})")
    return p


def peak_mib(path: str, ext: str, shape, backend: str, case: str) -> float:
    """The peak resident memory (MiB) one forward + backward of ``case`` adds above its inputs, in a
    fresh process of the checkout ``path`` (the extension loaded first)."""
    env = dict(os.environ, PYTHONPATH=os.path.abspath(path), TORCH_EXTENSIONS_DIR=ext, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", WORKER, *map(str, shape), backend, case], env=env, text=True,
                         capture_output=True, cwd=tempfile.gettempdir(), check=True).stdout
    return float(out.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--old", required=True, help="checkout of the 'before' commit")
    ap.add_argument("--new", default=".", help="checkout of the 'after' commit (default: this one)")
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--shape", default="2048,512,32000", help="N,H,V (float32)")
    ap.add_argument("--backend", default="cpu")
    ap.add_argument("--mem", action="store_true", help="also the extra peak memory of each case (fresh processes)")
    a = ap.parse_args(argv)
    shape = tuple(int(x) for x in a.shape.split(","))
    root = os.path.join(tempfile.gettempdir(), "fdiv-ab-extensions")  # kept: later runs reuse the builds
    procs = {k: start(path, os.path.join(root, k), shape, a.backend) for k, path in (("old", a.old), ("new", a.new))}
    res = {k: [] for k in procs}
    for r in range(a.rounds):
        for k in (("old", "new") if r % 2 == 0 else ("new", "old")):
            procs[k].stdin.write("go\n")
            procs[k].stdin.flush()
            res[k].append(json.loads(procs[k].stdout.readline()))
    for p in procs.values():
        p.stdin.close()
        p.wait()
    mem = {(k, c): peak_mib(path, os.path.join(root, k), shape, a.backend, c)
           for k, path in (("old", a.old), ("new", a.new)) for c in CASES} if a.mem else {}
    print(f"load {os.getloadavg()[0]:.1f}; {a.rounds} rounds; N,H,V = {a.shape} fp32, backend {a.backend}, "
          f"1 thread, process CPU time")
    print("| case | old s (median) | new s (median) | old / floor | new / floor | new / old |")
    print("|---|---|---|---|---|---|")
    for c in CASES:
        med = {k: statistics.median(x[c] for x in res[k]) for k in res}
        rat = {k: statistics.median(x[c] / x["floor"] for x in res[k]) for k in res}
        print(f"| {c} | {med['old']:.3f} | {med['new']:.3f} | {rat['old']:.3f} | {rat['new']:.3f} | "
              f"{rat['new'] / rat['old']:.3f} |")
    if mem:
        print("\n| case | old extra peak RSS (MiB) | new extra peak RSS (MiB) |\n|---|---|---|")
        for c in CASES:
            print(f"| {c} | {mem['old', c]:.0f} | {mem['new', c]:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
