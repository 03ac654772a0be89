"""The mini-lab: the paper's four claims at toy scale on CPU, regenerating ``docs/results.md``.

``make minilab`` (or ``python examples/minilab/run.py``) runs, in a pool of ``--jobs`` worker
processes with one thread each:

1. the v2 regime's data and base (``regime.py``, ``lab.py``): a tiny Llama pretrained until it
   knows four tasks in a plain format; SFT data teaches the chat format on a subset of the
   problems only; a second, weaker base from another seed (a different prior, Sec. 4.4);
2. an SFT learning-rate sweep (Sec. 4.2), each rate for the same budget with early stopping on
   the held-out SFT loss, then the same DPO;
3. Pearson, squared Hellinger, KL and JS as the SFT objective against NLL (Sec. 4.3);
4. App. D's SFT + lambda*DPO mixture as a negative control;
5. the stability study of ``fk.loss`` against the literal KL / JS forms (Sec. 5.2, ``stability.py``);

then writes the report (``report.py``): tables, figures, and a verdict per claim. Each arm runs
over ``--seeds`` (seed k: SFT shard k and data order k). ``--smoke`` is the test suite's tiny run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import resource
import sys
import time
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from typing import Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import lab  # noqa: E402
from fdiv_kernels.train.config import load_config  # noqa: E402
import regime  # noqa: E402
import report  # noqa: E402
import stability  # noqa: E402

SFT_LRS = (3e-4, 1e-3, 3e-3, 1e-2)
STANDARD_LR = 3e-3      # the trainer demo's SFT rate: the "usual" rate the paper lowers
DIVERGENCES = ("pearson", "squared_hellinger", "kl", "js")  # against NLL (tv) at STANDARD_LR
SMOKE_LRS, SMOKE_DIVERGENCES = (1e-3, 3e-3), ("pearson",)
STUDIES = ("lr", "div", "mix", "prior", "stability")
STABILITY = {"steps": 150, "seeds": (0, 1), "warm_steps": 150}
STABILITY_SMOKE = {"steps": 4, "seeds": (0,), "warm_steps": 3}


def _logged(log_path: str, fn, *args, **kwargs):
    """Run ``fn`` with its stdout/stderr (the trainer's log lines) going to ``log_path``."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    with open(log_path, "w") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        return fn(*args, **kwargs)


def plan(base: Dict, data: Dict, runs: str, sizes: lab.Sizes, seeds: List[int], skip, *, smoke: bool = False
         ) -> List[lab.ArmJob]:
    """Every SFT -> DPO arm on the main base, in the order they are queued."""
    jobs: List[lab.ArmJob] = []
    sft_lrs, divergences = (SMOKE_LRS, SMOKE_DIVERGENCES) if smoke else (SFT_LRS, DIVERGENCES)

    def add(key, sft, seed, **kw):
        jobs.append(lab.ArmJob(key=key, seed=seed, sft=sft, base=base["dir"], data=data, runs=runs, sizes=sizes,
                               shard=seeds.index(seed), **kw))

    lrs = sft_lrs if "lr" not in skip else (STANDARD_LR,) if ("div" not in skip or "mix" not in skip) else ()
    for lr in lrs:
        for s in seeds:
            add(f"lr={lr:g}", [f"sft.lr={lr}", "sft.divergence=tv"], s, keep_values=lr == STANDARD_LR,
                track_accuracy=s == seeds[0])
    if "div" not in skip:
        for d in divergences:
            for s in seeds:
                add(f"div={d}", [f"sft.lr={STANDARD_LR}", f"sft.divergence={d}"], s, keep_values=s == seeds[0])
    if "lr" not in skip:  # convergence control: the smallest rate with twice the budget
        add(f"lr={sft_lrs[0]:g} x2", [f"sft.lr={sft_lrs[0]}", "sft.divergence=tv"], seeds[0], budget=2.0)
    if "mix" not in skip:
        for s in seeds:
            add("mix_dpo", [f"sft.lr={STANDARD_LR}", "sft.divergence=tv", "sft.mix_dpo.enabled=true"], s)
    return jobs


def run_all(a) -> Dict:
    sizes = lab.SMOKE if a.smoke else lab.FULL
    stab_cfg = STABILITY_SMOKE if a.smoke else STABILITY
    seeds = list(a.seeds)
    data = regime.write_data(os.path.join(a.runs, "data"), n_pretrain=sizes.n_pretrain, n_sft=sizes.n_sft,
                             n_shards=len(seeds), n_pref=sizes.n_pref, n_eval=sizes.n_eval)
    logs = os.path.join(a.runs, "logs")
    res: Dict = {"arms": {}, "sizes": sizes.__dict__, "seeds": seeds, "standard_lr": STANDARD_LR,
                 "sft_batch": load_config(lab.V2_YAML).sft.batch_size,
                 "sft_lrs": list(SMOKE_LRS if a.smoke else SFT_LRS),
                 "divergences": list(SMOKE_DIVERGENCES if a.smoke else DIVERGENCES), "stability": None}
    from tqdm.auto import tqdm

    pool = ProcessPoolExecutor(max_workers=a.jobs, mp_context=mp.get_context("spawn"), initializer=lab.init_worker)
    try:
        pending: Dict[Future, str] = {}

        def submit(label, fn, *args, **kw):
            f = pool.submit(_logged, os.path.join(logs, label.replace("/", "_") + ".log"), fn, *args, **kw)
            pending[f] = label
            return f

        f_base = submit("base", lab.pretrain_base, data, a.runs, "base", steps=sizes.pretrain_steps, seed=0,
                        reuse=a.reuse_base)
        f_other = (submit("base-other-prior", lab.pretrain_base, data, a.runs, "base-other-prior",
                          steps=sizes.other_prior_steps, seed=1, reuse=a.reuse_base) if "prior" not in a.skip else None)
        stab_parts = []
        if "stability" not in a.skip:
            refs = stability.REFERENCES[:2] if a.smoke else stability.REFERENCES
            stab_parts = [submit(f"stability {r}", stability.run_reference, r, steps=stab_cfg["steps"],
                                 seeds=stab_cfg["seeds"], warm_steps=stab_cfg["warm_steps"], quick=a.smoke)
                          for r in refs]
        bar = tqdm(total=len(pending), desc="minilab", dynamic_ncols=True, disable=not a.progress)
        loads = res["load_samples"] = [round(os.getloadavg()[0], 2)]  # at every job's end: the machine's load

        def drain(until: Future):
            for f in as_completed(list(pending)):
                label = pending.pop(f)
                f.result()  # re-raise a worker's error here
                loads.append(round(os.getloadavg()[0], 2))
                bar.update(1)
                bar.set_postfix_str(label)
                if f is until:
                    return

        drain(f_base)
        res["base"] = f_base.result()
        jobs = plan(res["base"], data, a.runs, sizes, seeds, a.skip, smoke=a.smoke)
        arm_futs = [submit(f"{j.key} s{j.seed}", lab.arm, j) for j in jobs]
        bar.total += len(jobs)
        if f_other is not None:
            if not f_other.done():
                drain(f_other)
            res["base_other"] = f_other.result()
            other = lab.ArmJob(key="prior=other", seed=seeds[0], sft=[f"sft.lr={STANDARD_LR}", "sft.divergence=tv"],
                               base=res["base_other"]["dir"], data=data, runs=a.runs, sizes=sizes, keep_values=True)
            arm_futs.append(submit("prior=other", lab.arm, other))
            bar.total += 1
        while pending:
            drain(None)
        bar.close()
        for f in arm_futs:
            r = f.result()
            res["arms"].setdefault(r["key"], {})[r["seed"]] = r
        if stab_parts:
            res["stability"] = stability.combine([f.result() for f in stab_parts], a.out, **stab_cfg)
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)  # a failed job: do not wait for the queued ones
        raise
    pool.shutdown()
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="docs/minilab", help="figures and JSON")
    ap.add_argument("--results", default="docs/results.md")
    ap.add_argument("--runs", default="runs/minilab", help="run directories, data and logs")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--jobs", type=int, default=2, help="worker processes (one thread each)")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (the test suite's version)")
    ap.add_argument("--skip", nargs="*", default=[], choices=STUDIES)
    ap.add_argument("--reuse-results", action="store_true",
                    help="rewrite the report from OUT/results.json without running anything")
    ap.add_argument("--reuse-base", action="store_true",
                    help="development: take the pretrained bases from RUNS when there (same data and config only)")
    ap.add_argument("--no-progress", dest="progress", action="store_false")
    a = ap.parse_args(argv)
    if a.jobs < 1:
        ap.error(f"--jobs must be >= 1, got {a.jobs}")
    if len(set(a.seeds)) != len(a.seeds):
        ap.error(f"--seeds must be distinct, got {a.seeds}")
    t0 = time.time()
    load0 = os.getloadavg()
    os.makedirs(a.out, exist_ok=True)
    path = os.path.join(a.out, "results.json")
    if a.reuse_results:
        with open(path) as f:
            res = json.load(f)
        res["meta"]["report_command"] = "python examples/minilab/run.py " + " ".join(sys.argv[1:] if argv is None else argv)
    else:
        res = run_all(a)
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)  # the workers, joined at pool shutdown
        res["meta"] = {"wall_s": time.time() - t0, "jobs": a.jobs, "load_start": load0, "load_end": os.getloadavg(),
                       "worker_cpu_s": ru.ru_utime + ru.ru_stime, "load_samples": res.pop("load_samples"),
                       "command": "python examples/minilab/run.py " + " ".join(sys.argv[1:] if argv is None else argv),
                       "date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(), "smoke": a.smoke}
        with open(path, "w") as f:
            json.dump(res, f)
    report.write(res, a.out, a.results)
    print(f"wrote {a.results} and {a.out}/ ({(time.time() - t0) / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
