"""The training loop shared by every phase (pretrain, SFT, DPO).

A phase is described by a :class:`PhaseSpec` (how to collate a batch, what a micro-batch's loss
is, what to evaluate); :func:`train_phase` runs AdamW with warmup and a cosine/linear/constant
schedule, gradient accumulation, clipping, DDP or DeepSpeed, per-step metrics to
``metrics.jsonl``, periodic evaluation, atomic checkpoints and exact resumption.

The global batch of step ``k`` is a pure function of ``(seed, phase, k)``
(:class:`~fdiv_kernels.train.data.EpochSampler`), so the data position saved with a checkpoint
is the step counter, and a resumed run replays exactly the batches an uninterrupted run sees.
"""

from __future__ import annotations

import json
import math
import os
import time
import zlib
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Sequence, Tuple

import torch

from . import checkpoint as ckpt
from .config import OptimConfig, RunConfig
from .data import EpochSampler, shard
from .distributed import (DistInfo, all_reduce_sum, barrier, deepspeed_initialize, deepspeed_state_dict, no_sync,
                          reduce_stats, wrap_ddp)
from .modeling import BodyWithHead, gathered_head
from .steps import Norm, Stats


class MetricsLog:
    """Append-only JSON-lines log (written by rank 0 only)."""

    def __init__(self, path: str, enabled: bool = True):
        self.path, self.enabled = path, enabled

    def write(self, record: Dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def truncate(self, phase: str, after_step: int) -> None:
        """Drop this phase's records past ``after_step`` (before resuming from a checkpoint)."""
        self.drop(lambda r: r.get("phase") == phase and r.get("step", 0) > after_step)

    def drop(self, predicate: Callable[[Dict[str, Any]], bool]) -> None:
        """Rewrite the log without the records matching ``predicate`` (atomically)."""
        if not self.enabled or not os.path.exists(self.path):
            return
        with open(self.path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        keep = [r for r in rows if not predicate(r)]
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in keep)
        os.replace(tmp, self.path)


@dataclass
class RunContext:
    """What every phase shares: config, run directory, device, process group, tokenizer, log."""

    cfg: RunConfig
    run_dir: str
    device: torch.device
    dist: DistInfo
    tok: Any
    metrics: MetricsLog

    def log(self, msg: str) -> None:
        if self.dist.is_main:
            print(msg, flush=True)


class PhaseSpec:
    """Interface of a training phase (subclassed in :mod:`fdiv_kernels.train.phases`)."""

    name: str = "phase"
    cfg: OptimConfig

    def num_examples(self) -> int:
        raise NotImplementedError

    def collate(self, indices: Sequence[int]) -> Dict[str, Any]:
        """A micro-batch (tensors on the device) from example indices."""
        raise NotImplementedError

    def units(self, batch: Dict[str, Any]) -> float:
        """How many loss units (tokens / rows / pairs) the micro-batch holds."""
        raise NotImplementedError

    def micro(self, module, batch: Dict[str, Any], norm: Norm) -> Tuple[torch.Tensor, Stats]:
        raise NotImplementedError

    def after_step(self, metrics: Dict[str, float]) -> Dict[str, float]:
        """Hook after the optimizer step (e.g. the mix-DPO lambda update); extra metrics."""
        return {}

    def evaluate(self, model) -> Dict[str, float]:
        """Periodic evaluation (every ``cfg.eval_every`` steps)."""
        return {}

    def state_dict(self) -> Dict[str, Any]:
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        pass


def lr_lambda(cfg: OptimConfig) -> Callable[[int], float]:
    """Multiplier of the peak lr at step ``s``: linear warmup, then cosine / linear decay to
    ``min_lr_ratio`` at ``cfg.steps``, or constant."""
    if cfg.scheduler not in ("cosine", "linear", "constant"):
        raise ValueError(f"scheduler must be cosine, linear or constant, got {cfg.scheduler!r}")

    def f(s: int) -> float:
        if cfg.warmup_steps > 0 and s < cfg.warmup_steps:
            return (s + 1) / cfg.warmup_steps
        if cfg.scheduler == "constant":
            return 1.0
        span = max(cfg.steps - cfg.warmup_steps, 1)
        frac = min(max(s - cfg.warmup_steps, 0) / span, 1.0)
        shape = 0.5 * (1 + math.cos(math.pi * frac)) if cfg.scheduler == "cosine" else 1 - frac
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape

    return f


def micro_batch_size(cfg: OptimConfig, world_size: int) -> Tuple[int, int]:
    """``(per-process micro batch, micro-batches per step)`` for the global ``cfg.batch_size``."""
    if cfg.batch_size % world_size:
        raise ValueError(f"batch_size {cfg.batch_size} must be divisible by the number of processes {world_size}")
    local = cfg.batch_size // world_size
    mb = cfg.micro_batch_size or local
    if local % mb:
        raise ValueError(f"per-process batch {local} must be divisible by micro_batch_size {mb}")
    return mb, local // mb


def _seed_for(seed: int, phase: str) -> int:
    return seed * 7919 + zlib.crc32(phase.encode()) % 100_000


def train_phase(ctx: RunContext, spec: PhaseSpec, model: torch.nn.Module, *, resume: bool) -> Dict[str, Any]:
    """Train ``model`` in place for ``spec.cfg.steps`` optimizer steps; returns a summary dict.

    Checkpoints go to ``run_dir/<phase>/checkpoint-<step>`` (every ``save_every`` steps and at
    the end) and the result to ``run_dir/<phase>/final``. With ``resume`` the newest checkpoint of
    the phase is loaded (weights, optimizer, scheduler, RNG, phase state, step).
    """
    cfg, info, device = spec.cfg, ctx.dist, ctx.device
    phase_dir = os.path.join(ctx.run_dir, spec.name)
    os.makedirs(phase_dir, exist_ok=True)
    mb, n_micro = micro_batch_size(cfg, info.world_size)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))

    start = 0
    last = ckpt.latest_checkpoint(phase_dir) if resume else None
    ds_tag = None
    if last is not None:
        ckpt.load_weights(model, last)
        st = ckpt.load_trainer_state(last)
        if st["optimizer"]:  # empty under DeepSpeed: its own checkpoint holds the optimizer
            opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        ds_tag = st["extra"].get("deepspeed_tag")
        ckpt.set_rng_state(st["rng"])
        spec.load_state_dict(st["extra"].get("phase", {}))
        start = int(st["step"])
        ctx.metrics.truncate(spec.name, start)
        ctx.log(f"[{spec.name}] resumed from {last} at step {start}")
    else:
        ctx.metrics.truncate(spec.name, 0)

    body = BodyWithHead(model)
    engine = None
    if ctx.cfg.deepspeed:
        engine = deepspeed_initialize(body, opt, sched, ctx.cfg.deepspeed, micro_batch_size=mb, grad_accum=n_micro,
                                      max_grad_norm=cfg.max_grad_norm)
        module = engine
        if ds_tag is not None:
            engine.load_checkpoint(os.path.join(phase_dir, "deepspeed"), tag=ds_tag)
    else:
        module = wrap_ddp(body, info, device)

    sampler = EpochSampler(spec.num_examples(), cfg.batch_size, _seed_for(ctx.cfg.seed, spec.name))
    def evaluate() -> Dict[str, float]:
        with gathered_head(model):  # ZeRO-3: the fused eval losses need the full LM-head weight
            return spec.evaluate(model)

    def save(step: int, final: bool) -> None:
        sd = deepspeed_state_dict(engine) if engine is not None else None  # collective under ZeRO-3
        extra: Dict[str, Any] = {"phase": spec.state_dict()}
        if engine is not None:
            extra["deepspeed_tag"] = f"step-{step}"
            engine.save_checkpoint(os.path.join(phase_dir, "deepspeed"), tag=extra["deepspeed_tag"])
        if info.is_main:
            ckpt.save_checkpoint(phase_dir, step=step, model=model, tok=ctx.tok,
                                 optimizer=opt if engine is None else None, scheduler=sched, extra=extra,
                                 keep=cfg.keep_checkpoints, state_dict=sd)
            if final:
                ckpt.save_model(model, ctx.tok, os.path.join(phase_dir, "final"), state_dict=sd)

    if start == 0 and cfg.eval_every > 0:
        ev = evaluate()
        if ev:
            ctx.metrics.write({"phase": spec.name, "step": 0, **ev})

    bar = None
    if info.is_main and ctx.cfg.progress and start < cfg.steps:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=start, desc=spec.name, dynamic_ncols=True, leave=True)
    t_phase = time.time()
    last_rec: Dict[str, Any] = {}
    for step in range(start, cfg.steps):
        t0 = time.time()
        idx = shard(sampler.batch(step), rank=info.rank, world_size=info.world_size)
        batches = [spec.collate(idx[i: i + mb]) for i in range(0, len(idx), mb)]
        global_units = all_reduce_sum([float(sum(spec.units(b) for b in batches))], device)[0]
        norm = Norm(global_units, len(batches), info.world_size)
        acc: Dict[str, List[float]] = defaultdict(lambda: [0.0, 0.0])
        n_tokens = 0
        lr_now = sched.get_last_lr()[0]
        for i, b in enumerate(batches):
            n_tokens += int(b["attention_mask"].sum())
            if engine is not None:
                with gathered_head(model):
                    loss, st = spec.micro(engine, b, norm)
                    engine.backward(loss * n_micro)  # DeepSpeed divides by the accumulation steps itself
                    engine.step()
            else:
                with no_sync(module, i < len(batches) - 1):
                    loss, st = spec.micro(module, b, norm)
                    loss.backward()
            for k, (s, c) in st.items():
                acc[k][0] += s
                acc[k][1] += c
        if engine is not None:
            gn = float(engine.get_global_grad_norm() or 0.0)
        else:
            gn = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf))
            if not math.isfinite(gn):
                raise FloatingPointError(f"[{spec.name}] step {step + 1}: gradient norm is {gn}; stopping "
                                         "(lower the lr, check the data)")
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
        metrics = reduce_stats(dict(acc), device)
        n_tokens = int(all_reduce_sum([float(n_tokens)], device)[0])
        metrics.update(spec.after_step(metrics))
        dt = time.time() - t0
        rec = {"phase": spec.name, "step": step + 1, **metrics, "grad_norm": gn, "lr": lr_now,
               "tokens_per_s": n_tokens / max(dt, 1e-9), "step_time_s": dt}
        if cfg.eval_every > 0 and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps):
            rec.update(evaluate())
        if not math.isfinite(rec.get("loss", 0.0)):
            raise FloatingPointError(f"[{spec.name}] step {step + 1}: loss is {rec['loss']}")
        if (step + 1) % max(cfg.log_every, 1) == 0 or step + 1 == cfg.steps or "align_accuracy" in rec:
            ctx.metrics.write(rec)
        last_rec = rec
        if bar is not None:
            bar.update(1)
            bar.set_postfix({k: f"{rec[k]:.3g}" for k in ("loss", "nll", "accuracy", "align_accuracy") if k in rec})
        done = step + 1 == cfg.steps
        if done or (cfg.save_every > 0 and (step + 1) % cfg.save_every == 0):
            save(step + 1, final=done)
    if bar is not None:
        bar.close()
    if start >= cfg.steps:  # resumed after the last checkpoint but before the final model was written
        save(cfg.steps, final=True)
    barrier()
    model.eval()
    return {"steps": cfg.steps, "resumed_from": start, "seconds": round(time.time() - t_phase, 2),
            "last": {k: v for k, v in last_rec.items() if isinstance(v, (int, float))}}
