"""Mini-lab v2 jobs, each run in a worker process with one thread (see ``run.py``).

* :func:`pretrain_base`: pretrain a base on the regime's text (``regime.py``) and grade it;
* :func:`arm`: SFT for a fixed budget with a checkpoint per evaluation -> early stopping on the
  held-out SFT loss -> the same DPO from the chosen checkpoint -> grade both models.

Both use the trainer only through :func:`fdiv_kernels.train.pipeline.run_command` and the
``examples/minilab/regime_v2.yaml`` config with ``--set``-style overrides.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

import regime
from fdiv_kernels.train.config import load_config
from fdiv_kernels.data import load_sft
from fdiv_kernels.hf import load_model, load_tokenizer
from fdiv_kernels.train.pipeline import run_command

HERE = os.path.dirname(os.path.abspath(__file__))
V2_YAML = os.path.join(HERE, "regime_v2.yaml")


@dataclass
class Sizes:
    """Data and step counts of a study (``FULL`` for ``make minilab``, ``SMOKE`` for the tests)."""

    n_pretrain: int = 60000
    n_sft: int = 2000
    n_pref: int = 2000
    n_eval: int = 40            # held-out prompts per task and set (seen / unseen): 160 + 160
    pretrain_steps: int = 2500
    other_prior_steps: int = 1000  # the second base (Sec. 4.4: a different prior)
    sft_steps: int = 500
    sft_every: int = 50
    dpo_steps: int = 150
    accuracy_every: int = 50    # graded checkpoints along SFT for the curve runs
    log_every: int = 5          # V(s0) is logged every this many SFT steps

    def overrides(self) -> List[str]:
        return [f"sft.steps={self.sft_steps}", f"sft.eval_every={self.sft_every}", f"sft.save_every={self.sft_every}",
                f"sft.log_every={self.log_every}", f"dpo.steps={self.dpo_steps}"]


FULL = Sizes()
SMOKE = Sizes(n_pretrain=600, n_sft=64, n_pref=64, n_eval=4, pretrain_steps=12, other_prior_steps=6, sft_steps=12,
              sft_every=4, dpo_steps=3, accuracy_every=4, log_every=1)


@dataclass
class ArmJob:
    """One SFT -> DPO run. ``sft``: overrides of the SFT phase (``sft.lr=...``)."""

    key: str
    seed: int
    sft: List[str]
    base: str                 # base checkpoint directory
    data: Dict[str, object]   # regime.write_data paths
    runs: str
    sizes: Sizes
    shard: int = 0
    keep_values: bool = False     # store V(s) of the SFT model (Sec. 4.4)
    track_accuracy: bool = False  # grade SFT checkpoints along the run (V(s0) vs accuracy)
    extra: List[str] = field(default_factory=list)
    budget: float = 1.0           # SFT steps as a multiple of ``sizes.sft_steps`` (convergence control)


def _sets(data) -> Dict[str, list]:
    return {"seen": load_sft(data["eval_seen"]), "unseen": load_sft(data["eval_unseen"])}


def _common(data, runs: str, name: str, seed: int, model_path: Optional[str]) -> List[str]:
    o = [f"output_dir={runs}", f"name={name}", f"seed={seed}", f"data.dpo_train={data['dpo_train']}",
         f"data.eval_pref={data['eval_pref']}", f"data.eval_prompts={data['valid']}"]
    return o + ([f"model.path={model_path}"] if model_path else [])


def pretrain_base(data: Dict[str, object], runs: str, name: str, *, steps: int, seed: int, reuse: bool = False) -> Dict:
    """Pretrain a base (``pipeline`` with one-step SFT/DPO placeholders) and grade it. ``reuse``: take
    ``runs/name/pretrain/final`` when it exists (development; the data and config must be unchanged)."""
    t0 = time.time()
    base_dir = os.path.join(runs, name, "pretrain", "final")
    if not (reuse and os.path.exists(os.path.join(base_dir, "model.safetensors"))):
        cfg = load_config(V2_YAML, _common(data, runs, name, seed, None) + [
            f"pretrain.steps={steps}", f"data.pretrain={data['pretrain']}", f"data.sft_train={data['sft_train'][0]}",
            "sft.steps=1", "sft.eval_every=0", "sft.save_every=0", "dpo.steps=1", "dpo.rejected=data"])
        s = run_command(cfg, "pipeline", overwrite=True)  # the lab's own run directories: make minilab redoes them
        base_dir = s["checkpoints"]["pretrain"]
        for sub in ("sft", "dpo"):  # the placeholders are not part of the study
            shutil.rmtree(os.path.join(s["run_dir"], sub), ignore_errors=True)
    tok = load_tokenizer(base_dir)
    model = load_model(base_dir).eval()
    sets = _sets(data)
    return {"dir": base_dir, "eval": regime.evaluate(model, tok, sets), "seconds": time.time() - t0, "steps": steps,
            "heldout_nll": regime.answer_stats(model, regime.chat_batches(tok, load_sft(data["valid"])[:128]))["nll"]}


def _sft_curves(metrics_path: str) -> Dict[str, List]:
    c = {"step": [], "value_s0": [], "eval_step": [], "heldout_logratio": [], "align_dpo_loss": [],
         "align_accuracy": []}
    with open(metrics_path) as f:
        for line in f:
            r = json.loads(line)
            if r.get("phase") != "sft":
                continue
            if "value_s0" in r:
                c["step"].append(r["step"])
                c["value_s0"].append(r["value_s0"])
            if "kl_ref_heldout" in r:
                c["eval_step"].append(r["step"])
                c["heldout_logratio"].append(r["kl_ref_heldout"])
                c["align_dpo_loss"].append(r.get("align_dpo_loss"))
                c["align_accuracy"].append(r.get("align_accuracy"))
    return c


def arm(job: ArmJob) -> Dict:
    """SFT (fixed budget, checkpoint per evaluation) -> early stop -> DPO -> grades; returns a record."""
    t0 = time.time()
    name = f"{job.key}-s{job.seed}".replace("/", "_").replace(" ", "_")
    data, sizes = job.data, job.sizes
    common = _common(data, job.runs, name, job.seed, job.base)
    cfg = load_config(V2_YAML, common + sizes.overrides() + [f"data.sft_train={data['sft_train'][job.shard]}",
                                                             f"sft.steps={round(sizes.sft_steps * job.budget)}"]
                      + job.sft + job.extra)
    s = run_command(cfg, "sft", overwrite=True)
    run_dir = s["run_dir"]
    curves = _sft_curves(os.path.join(run_dir, "metrics.jsonl"))
    # early stopping: the evaluation (after step 0) with the lowest held-out NLL = highest logratio to base
    cands = [(lr, st) for st, lr in zip(curves["eval_step"], curves["heldout_logratio"]) if st > 0]
    best_step = max(cands, key=lambda t: (t[0], -t[1]))[1]
    ckpts = {int(p.rsplit("-", 1)[1]): p for p in glob.glob(os.path.join(run_dir, "sft", "checkpoint-*"))}
    start = ckpts[best_step]

    base = load_model(job.base).eval()
    tok = load_tokenizer(job.base)
    sets = _sets(data)
    valid_batches = regime.chat_batches(tok, load_sft(data["valid"])[:128])  # the trainer's held-out SFT loss set
    if job.track_accuracy:
        curves["acc_step"], curves["acc_seen"], curves["acc_unseen"] = [], [], []
        for st in sorted(ckpts):
            if st % sizes.accuracy_every == 0:
                e = regime.evaluate(load_model(ckpts[st]), tok, sets, plain=False)
                curves["acc_step"].append(st)
                curves["acc_seen"].append(e["seen"]["chat"]["all"])
                curves["acc_unseen"].append(e["unseen"]["chat"]["all"])
    sft_model = load_model(start).eval()
    res = {"key": job.key, "seed": job.seed, "shard": job.shard, "run_dir": run_dir, "sft_best_step": best_step,
           "sft_steps": cfg.sft.steps, "curves": curves,
           "sft": regime.evaluate(sft_model, tok, sets, base=base)}
    st = regime.answer_stats(sft_model, valid_batches)
    res["sft_heldout_nll"] = st["nll"]
    if job.keep_values:
        all_rows = sets["seen"][:64] + sets["unseen"][:64]
        res["values"] = [round(v, 4) for v in regime.answer_stats(sft_model, regime.chat_batches(tok, all_rows))["values"]]
    i = curves["eval_step"].index(best_step)
    res["sft_align_dpo_loss"] = curves["align_dpo_loss"][i]
    del sft_model

    dcfg = load_config(V2_YAML, _common(data, job.runs, name + "-dpo", job.seed, start) + sizes.overrides()
                       + [f"data.sft_train={data['sft_train'][job.shard]}"] + job.extra)
    d = run_command(dcfg, "dpo", overwrite=True)
    res["dpo"] = regime.evaluate(load_model(d["checkpoints"]["dpo"]).eval(), tok, sets, base=base)
    res["dpo_rejected_self"] = d["phases"].get("dpo_rejected_self")
    # keep the chosen SFT checkpoint and the DPO result; drop the other checkpoints (tens of MB per run)
    for p in list(ckpts.values()) + glob.glob(os.path.join(d["run_dir"], "dpo", "checkpoint-*")):
        if p != start:
            shutil.rmtree(p, ignore_errors=True)
    res["seconds"] = time.time() - t0
    return res


def init_worker(threads: int = 1) -> None:
    """Process-pool initializer: one intra-op thread per job (jobs run side by side)."""
    torch.set_num_threads(threads)


__all__ = ["ArmJob", "FULL", "SMOKE", "Sizes", "arm", "init_worker", "pretrain_base"]
