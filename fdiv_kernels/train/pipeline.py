"""Orchestration of the ``sft``, ``dpo`` and ``pipeline`` commands.

``pipeline``: [pretrain the tiny base] -> evaluate base -> SFT (reference = base) -> evaluate ->
DPO from the SFT model (reference = the SFT model unless ``dpo.reference`` says otherwise) ->
evaluate -> plots, ``summary.json``, a printed summary.
"""

from __future__ import annotations

import copy
import json
import os
import random
import shutil
import time
from typing import Any, Dict, List, Optional

import torch

from ..collate import collate
from ..data import encode_pref, encode_sft, encode_text, load_pref, load_sft, prompt_text
from ..errors import ConfigError
from ..hf import default_deepspeed_accelerator, load_model
from . import checkpoint as ckpt
from .config import RunConfig, to_dict
from .distributed import barrier, broadcast_object, init_distributed, local_device
from .evaluate import greedy_answers, task_accuracy
from .interrupt import graceful_stop
from .modeling import build_tiny_model, enable_checkpointing, param_count
from .phases import DPOPhase, PretrainPhase, SFTPhase
from .plots import plot_run
from .reporting import make_reporters
from .synthetic import check_answer, checkable, generate_dataset
from .tokenizer import build_char_tokenizer
from .trainer import MetricsLog, RunContext, train_phase
from .validate import RUN_OUTPUTS, Prepared, check_run_dir, existing_run, preflight


def setup(cfg: RunConfig, info, prep: Prepared, *, overwrite: bool, config_changes: List[str]) -> RunContext:
    """Run directory (cleared only with ``overwrite``), device, seeds, tokenizer. Runs after
    :func:`~fdiv_kernels.train.validate.preflight`: nothing here should fail on user input."""
    device = local_device(cfg.device, info)
    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    try:  # no "Writing model shards" bars from transformers between our own progress bars
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass
    run_dir = os.path.join(cfg.output_dir, cfg.name)
    if info.is_main:
        if overwrite or not existing_run(run_dir):  # a refused directory never gets here (preflight)
            for name in RUN_OUTPUTS:
                p = os.path.join(run_dir, name)
                if os.path.isdir(p):
                    shutil.rmtree(p)
                elif os.path.exists(p):
                    os.remove(p)
        os.makedirs(run_dir, exist_ok=True)
        ckpt.atomic_json(to_dict(cfg), os.path.join(run_dir, "config.json"))
        if config_changes:  # accepted with --allow-config-change: keep a record of them
            with open(os.path.join(run_dir, "config-history.jsonl"), "a", encoding="utf-8") as f:
                f.write(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "changes": config_changes}) + "\n")
    barrier()
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    tok = prep.tok if prep.tok is not None else build_char_tokenizer()
    reporters = make_reporters(cfg.report_to, run_dir, to_dict(cfg)) if info.is_main else []
    ctx = RunContext(cfg=cfg, run_dir=run_dir, device=device, dist=info, tok=tok,
                     metrics=MetricsLog(os.path.join(run_dir, "metrics.jsonl"), enabled=info.is_main,
                                        reporters=reporters))
    if config_changes:
        ctx.log(f"[setup] resuming with configuration changes: {'; '.join(config_changes)}")
    return ctx


def base_model(ctx: RunContext) -> torch.nn.Module:
    """The start model: ``model.path`` or the tiny Llama (seeded by ``cfg.seed``)."""
    cfg = ctx.cfg
    if cfg.model.path:
        m = load_model(cfg.model.path, dtype=cfg.model.dtype)
    else:
        torch.manual_seed(cfg.seed)
        m = build_tiny_model(cfg.model, ctx.tok)
    if cfg.model.gradient_checkpointing and hasattr(m, "gradient_checkpointing_enable"):
        enable_checkpointing(m)
    return m.to(ctx.device)


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    ref = copy.deepcopy(model)
    ref.eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def data_paths(ctx: RunContext) -> Dict[str, Optional[str]]:
    """Configured data paths; the synthetic set (written to ``run_dir/data``) fills the empty ones."""
    d = ctx.cfg.data
    paths = {"sft_train": d.sft_train, "dpo_train": d.dpo_train, "eval_pref": d.eval_pref,
             "eval_prompts": d.eval_prompts, "pretrain": d.pretrain}
    needed = ["sft_train", "dpo_train", "eval_pref", "eval_prompts"] + (["pretrain"] if ctx.cfg.pretrain.steps > 0 else [])
    if all(paths[k] for k in needed):
        return paths
    s = d.synthetic
    out = os.path.join(ctx.run_dir, "data")
    syn = None
    if ctx.dist.is_main:
        syn = generate_dataset(out, n_sft=s.n_sft, n_pref=s.n_pref, n_eval=s.n_eval, n_pretrain=s.n_pretrain,
                               seed=s.seed, tasks=s.tasks, pretrain_noise=s.pretrain_noise)
    syn = broadcast_object(syn)  # the other processes wait here until the files exist
    return {k: v or syn[k] for k, v in paths.items()}


class Pipeline:
    """Loads data once and runs the phases a command asks for."""

    def __init__(self, ctx: RunContext, rows: Optional[Dict[str, List[dict]]] = None):
        self.ctx = ctx
        self._rows = dict(rows or {})  # validated by preflight: not read twice
        cfg = ctx.cfg
        self.paths = data_paths(ctx)
        self.max_len = cfg.data.max_length
        self.t0 = time.time()
        self.accuracy: Dict[str, Any] = {}
        self.phases: Dict[str, Any] = {}
        self.eval_rows = self._load(load_sft, self.paths["eval_prompts"])[: cfg.eval.num_prompts]
        self.can_grade = cfg.eval.task_accuracy and checkable(self.eval_rows)
        eval_pref_rows = self._load(load_pref, self.paths["eval_pref"])[: cfg.data.max_eval_pairs]
        self.eval_pairs = encode_pref(ctx.tok, eval_pref_rows, max_length=self.max_len)
        e = cfg.eval
        held = encode_sft(ctx.tok, self.eval_rows[: e.kl_prompts], max_length=self.max_len)
        self.kl_batches = [{k: v.to(ctx.device) for k, v in
                            collate(held[s: s + e.kl_batch_size], pad_id=ctx.tok.pad_token_id).items()}
                           for s in range(0, len(held), e.kl_batch_size)]

    def _load(self, loader, path: str) -> List[dict]:
        rows = self._rows.get(path)
        return list(rows) if rows is not None else loader(path)

    # -- evaluation -----------------------------------------------------------------------------
    def grade(self, label: str, model) -> None:
        if not self.can_grade:
            return
        e = self.ctx.cfg.eval
        res = task_accuracy(model, self.ctx.tok, self.eval_rows, max_new_tokens=e.max_new_tokens,
                            batch_size=e.batch_size, device=self.ctx.device)
        self.accuracy[label] = res
        self.ctx.metrics.drop(lambda r: r.get("phase") == "eval" and r.get("model") == label)  # a resumed run re-grades
        self.ctx.metrics.write({"phase": "eval", "model": label, "task_accuracy": res["accuracy"], **{
            f"task_accuracy/{k}": v for k, v in res["per_task"].items()}})
        self.ctx.log(f"[eval] task accuracy of the {label} model: {100 * res['accuracy']:.1f}% "
                     f"({', '.join(f'{k} {100 * v:.0f}%' for k, v in res['per_task'].items())}); e.g. "
                     + "; ".join(f"{s['prompt']!r} -> {s['output']!r}" for s in res["samples"][:2]))

    # -- phases -----------------------------------------------------------------------------------
    def _done(self, phase: str, model, resume: bool) -> bool:
        final = os.path.join(self.ctx.run_dir, phase, "final")
        if not resume or not os.path.isdir(final):
            return False
        why = broadcast_object(ckpt.final_problem(final, model) if self.ctx.dist.is_main else None)
        if why is not None:
            self.ctx.log(f"[{phase}] {final} is not a complete result ({why}); resuming the phase from its checkpoints")
            return False
        ckpt.load_weights(model, final)
        self.ctx.log(f"[{phase}] already finished: loaded {final}")
        self.phases[phase] = {"skipped": True, "final": final}
        return True

    def pretrain(self, model, *, resume: bool):
        """Returns the model the next phase starts from (see :func:`train_phase`)."""
        cfg, ctx = self.ctx.cfg, self.ctx
        if cfg.pretrain.steps <= 0 or self._done("pretrain", model, resume):
            return model
        with open(self.paths["pretrain"], encoding="utf-8") as f:
            text = f.read()
        ex = encode_text(ctx.tok, text, seq_length=cfg.pretrain.seq_length)
        spec = PretrainPhase(cfg.pretrain, ex, pad_id=ctx.tok.pad_token_id, device=ctx.device, backend=cfg.backend)
        ctx.log(f"[pretrain] {len(ex)} windows of {cfg.pretrain.seq_length} tokens, {cfg.pretrain.steps} steps")
        model, self.phases["pretrain"] = train_phase(ctx, spec, model, resume=resume)
        return model

    def sft(self, model, *, resume: bool):
        cfg, ctx = self.ctx.cfg, self.ctx
        if self._done("sft", model, resume):
            return model
        start = frozen_copy(model)  # the start (base) model: reference and alignment baseline
        rows = self._load(load_sft, self.paths["sft_train"])
        ex = encode_sft(ctx.tok, rows, max_length=self.max_len)
        pairs = None
        if cfg.sft.mix_dpo.enabled:
            pairs = encode_pref(ctx.tok, self._load(load_pref, self.paths["dpo_train"]), max_length=self.max_len)
        spec = SFTPhase(cfg.sft, ex, pad_id=ctx.tok.pad_token_id, device=ctx.device, backend=cfg.backend, ref_model=start,
                        pairs=pairs, eval_pairs=self.eval_pairs, kl_batches=self.kl_batches, align_beta=cfg.dpo.beta,
                        eval_cfg=cfg.eval)
        ctx.log(f"[sft] divergence={cfg.sft.divergence} beta={cfg.sft.beta} level={cfg.sft.level} "
                f"reference={'start model' if spec.use_ref else 'none'}"
                f"{' mix_dpo (App. D control)' if cfg.sft.mix_dpo.enabled else ''}; {len(ex)} examples, "
                f"{cfg.sft.steps} steps x {cfg.sft.batch_size}, lr {cfg.sft.lr}")
        model, self.phases["sft"] = train_phase(ctx, spec, model, resume=resume)
        del start
        return model

    def dpo(self, model, *, resume: bool, base=None):
        cfg, ctx = self.ctx.cfg, self.ctx
        d = cfg.dpo
        if self._done("dpo", model, resume):
            return model
        start = frozen_copy(model)
        if d.reference == "start":
            ref = start
        elif d.reference == "base":
            if base is None:
                raise ValueError("dpo.reference=base needs the pipeline's base model; use 'start' or a path")
            ref = base
        else:
            ref = frozen_copy(load_model(d.reference, dtype=cfg.model.dtype).to(ctx.device))
        rows = self._load(load_pref, self.paths["dpo_train"])
        if d.rejected == "self":
            rows = self.on_policy_rejected(start, rows)
        elif d.rejected != "data":
            raise ValueError(f"dpo.rejected must be 'data' or 'self', got {d.rejected!r}")
        pairs = encode_pref(ctx.tok, rows, max_length=self.max_len)
        spec = DPOPhase(d, pairs, pad_id=ctx.tok.pad_token_id, device=ctx.device, backend=cfg.backend,
                        ref_model=ref if d.spec.needs_reference else None, eval_ref=start, eval_pairs=self.eval_pairs,
                        kl_batches=self.kl_batches, eval_cfg=cfg.eval)
        ctx.log(f"[dpo] loss_type={d.loss_type} beta={d.beta} gamma={d.gamma} reference={d.reference} rejected={d.rejected}; "
                f"{len(pairs)} pairs, {d.steps} steps x {d.batch_size}, lr {d.lr}")
        model, self.phases["dpo"] = train_phase(ctx, spec, model, resume=resume)
        if d.rejected == "self":
            self.phases["dpo"]["rejected_self"] = self.rejected_self
        return model

    def on_policy_rejected(self, model, rows: List[dict]) -> List[dict]:
        """Replace each pair's rejected answer by the model's own greedy answer when that is wrong
        (a realistic mistake); keep the data's rejected answer where the model is right."""
        if not checkable([{"messages": r["chosen"]} for r in rows]):
            raise ValueError("dpo.rejected=self needs synthetic (automatically checkable) prompts")
        e = self.ctx.cfg.eval
        prompts = [prompt_text(self.ctx.tok, r["chosen"]) for r in rows]
        outs = greedy_answers(model, self.ctx.tok, prompts, max_new_tokens=e.max_new_tokens,
                              batch_size=max(e.batch_size, self.ctx.cfg.dpo.rejected_batch_size), device=self.ctx.device)
        new, n_self = [], 0
        for r, o in zip(rows, outs):
            q = r["chosen"][-2]["content"]
            if o.strip() and not check_answer(q, o):
                r = dict(r, rejected=r["chosen"][:-1] + [{"role": "assistant", "content": o.strip()}])
                n_self += 1
            new.append(r)
        self.ctx.log(f"[dpo] on-policy rejected answers: {n_self}/{len(rows)} pairs use the start model's own "
                     "wrong greedy answer")
        self.rejected_self = n_self
        return new

    # -- reporting --------------------------------------------------------------------------------
    def finish(self, command: str, model) -> Dict[str, Any]:
        ctx, cfg = self.ctx, self.ctx.cfg
        acc = {k: v["accuracy"] for k, v in self.accuracy.items()}
        summary = {
            "name": cfg.name, "command": command, "run_dir": os.path.abspath(ctx.run_dir),
            "model": cfg.model.path or "tiny Llama (built locally)", "parameters": param_count(model),
            "sft_divergence": cfg.sft.divergence, "sft_beta": cfg.sft.beta, "dpo_kind": cfg.dpo.loss_type,
            "dpo_beta": cfg.dpo.beta, "task_accuracy": acc,
            "task_accuracy_per_task": {k: v["per_task"] for k, v in self.accuracy.items()},
            "phases": self.phases, "seconds": round(time.time() - self.t0, 1),
            "metrics": os.path.join(ctx.run_dir, "metrics.jsonl"), "plots": os.path.join(ctx.run_dir, "plots"),
            **{name: os.path.join(ctx.run_dir, name) for name in cfg.report_to},  # tensorboard/, wandb/
            "checkpoints": {p: os.path.join(ctx.run_dir, p, "final") for p in ("pretrain", "sft", "dpo")
                            if os.path.isdir(os.path.join(ctx.run_dir, p, "final"))},
        }
        if ctx.dist.is_main:
            summary["plot_files"] = plot_run(ctx.run_dir, accuracy=acc or None)
            ckpt.atomic_json(summary, os.path.join(ctx.run_dir, "summary.json"))
            print(format_summary(summary), flush=True)
        barrier()
        return summary


def format_summary(s: Dict[str, Any]) -> str:
    lines = ["", "=" * 72, f"fdiv-train {s['command']} '{s['name']}' finished in {s['seconds']} s "
             f"({s['parameters'] / 1e6:.2f}M-parameter {s['model']})",
             f"SFT objective: {s['sft_divergence']} (beta {s['sft_beta']}); DPO: {s['dpo_kind']} (beta {s['dpo_beta']})"]
    if s["task_accuracy"]:
        labels = list(s["task_accuracy"])
        lines.append("task accuracy (greedy, held-out prompts):  " + "   ".join(
            f"{k}: {100 * v:5.1f}%" for k, v in s["task_accuracy"].items()))
        tasks = sorted({t for v in s["task_accuracy_per_task"].values() for t in v})
        lines.append("  per task  " + " ".join(f"{lab:>10}" for lab in labels))
        for t in tasks:
            lines.append(f"  {t:<9} " + " ".join(f"{100 * s['task_accuracy_per_task'][lab].get(t, 0):9.1f}%"
                                                 for lab in labels))
    lines += [f"metrics:     {s['metrics']}", f"plots:       {s['plots']}"]
    if "tensorboard" in s:
        lines.append(f"tensorboard: {s['tensorboard']}  (tensorboard --logdir {s['tensorboard']})")
    if "wandb" in s:
        lines.append(f"wandb:       {s['wandb']}")
    for p, d in s["checkpoints"].items():
        lines.append(f"checkpoint:  {p:<9} {d}")
    lines.append(f"summary:     {os.path.join(s['run_dir'], 'summary.json')}")
    lines.append("=" * 72)
    return "\n".join(lines)


def run_command(cfg: RunConfig, command: str, *, resume: bool = False, overwrite: bool = False,
                allow_config_change: bool = False) -> Dict[str, Any]:
    """Run ``sft``, ``dpo`` or ``pipeline`` with ``cfg``; returns the summary.

    Everything is validated first (:func:`~fdiv_kernels.train.validate.preflight`): a bad value,
    path or data file raises a :class:`~fdiv_kernels.train.errors.ConfigError` before any model
    is built or any file deleted. A run directory that holds a run is replaced only with
    ``overwrite``; ``resume`` continues it (and refuses a changed configuration unless
    ``allow_config_change``).
    """
    if command not in ("sft", "dpo", "pipeline"):
        raise ConfigError(f"unknown command {command!r}; use sft, dpo or pipeline")
    threads = torch.get_num_threads()
    try:
        with graceful_stop():  # Ctrl-C: finish the step, save a checkpoint, raise TrainingInterrupted
            return _run(cfg, command, resume=resume, overwrite=overwrite, allow_config_change=allow_config_change)
    finally:
        torch.set_num_threads(threads)  # cfg.num_threads applies to this run only


def _run(cfg: RunConfig, command: str, *, resume: bool, overwrite: bool, allow_config_change: bool) -> Dict[str, Any]:
    default_deepspeed_accelerator()
    info = init_distributed("cuda" if (cfg.device in ("auto", "cuda") and torch.cuda.is_available()) else "cpu",
                            need_group=cfg.fsdp.enabled)
    prep = preflight(cfg, command, world_size=info.world_size, check_dir=False)
    verdict = None
    if info.is_main:  # one process judges the run directory, while no process has touched it
        try:
            verdict = check_run_dir(cfg, resume=resume, overwrite=overwrite, allow_config_change=allow_config_change)
        except ConfigError as err:
            verdict = err
    verdict = broadcast_object(verdict)
    if isinstance(verdict, ConfigError):
        raise verdict
    ctx = setup(cfg, info, prep, overwrite=overwrite, config_changes=verdict)
    try:
        return _commands(ctx, prep, command, resume=resume)
    finally:
        ctx.metrics.close()


def _commands(ctx: RunContext, prep: Prepared, command: str, *, resume: bool) -> Dict[str, Any]:
    cfg = ctx.cfg
    pipe = Pipeline(ctx, prep.rows)
    model = base_model(ctx)
    ctx.log(f"[setup] run dir {ctx.run_dir}; device {ctx.device}; {ctx.dist.world_size} process(es); "
            f"model {cfg.model.path or 'tiny Llama'} ({param_count(model) / 1e6:.2f}M parameters); backend {cfg.backend}")
    if command == "pipeline":
        model = pipe.pretrain(model, resume=resume)
        pipe.grade("base", model)
        base = frozen_copy(model) if cfg.dpo.reference == "base" else None
        model = pipe.sft(model, resume=resume)
        pipe.grade("sft", model)
        model = pipe.dpo(model, resume=resume, base=base)
        pipe.grade("dpo", model)
    elif command == "sft":
        pipe.grade("base", model)
        model = pipe.sft(model, resume=resume)
        pipe.grade("sft", model)
    else:
        pipe.grade("start", model)
        model = pipe.dpo(model, resume=resume)
        pipe.grade("dpo", model)
    return pipe.finish(command, model)
