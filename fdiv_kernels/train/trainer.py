"""The training loop shared by every phase (pretrain, SFT, DPO).

A phase is described by a :class:`PhaseSpec` (how to collate a batch, what a micro-batch's loss
is, what to evaluate); :func:`train_phase` runs AdamW with warmup and a cosine/linear/constant
schedule, gradient accumulation and clipping on one process, DDP, DeepSpeed or FSDP2
(:mod:`.engines`), with per-step metrics to ``metrics.jsonl``, periodic evaluation, atomic
verified checkpoints and exact resumption.

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
from .distributed import DistInfo, all_reduce_sum, barrier, broadcast_object, reduce_stats
from .engines import engine_class, lr_lambda  # noqa: F401  (lr_lambda: re-exported)
from .errors import TrainingInterrupted
from .interrupt import interrupt_requested
from .steps import Norm, Stats


class MetricsLog:
    """Append-only JSON-lines log (written by rank 0 only), mirrored to ``reporters``
    (TensorBoard, W&B: :mod:`fdiv_kernels.train.reporting`)."""

    def __init__(self, path: str, enabled: bool = True, reporters: Sequence[Any] = ()):
        self.path, self.enabled, self.reporters = path, enabled, list(reporters)

    def write(self, record: Dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        for r in self.reporters:
            r.write(record)

    def close(self) -> None:
        for r in self.reporters:
            r.close()
        self.reporters = []

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


def train_phase(ctx: RunContext, spec: PhaseSpec, model: torch.nn.Module, *,
                resume: bool) -> Tuple[torch.nn.Module, Dict[str, Any]]:
    """Train ``model`` for ``spec.cfg.steps`` optimizer steps; returns ``(trained model, summary)``.

    The trained model is ``model`` itself (one process, DDP) or, after DeepSpeed / FSDP2, a plain
    rebuilt model holding the gathered weights (:meth:`~.engines.LocalEngine.release`).
    Checkpoints go to ``run_dir/<phase>/checkpoint-<step>`` (every ``save_every`` steps, at the
    end, and on SIGINT / SIGTERM, after which :class:`TrainingInterrupted` is raised) and the result to ``run_dir/<phase>/final``. With ``resume`` the newest checkpoint
    that passes its checks is loaded (weights, optimizer, scheduler, RNG, phase state, step);
    damaged newer ones are reported and skipped.
    """
    cfg, info, device = spec.cfg, ctx.dist, ctx.device
    phase_dir = os.path.join(ctx.run_dir, spec.name)
    os.makedirs(phase_dir, exist_ok=True)
    mb, n_micro = micro_batch_size(cfg, info.world_size)
    cls = engine_class(ctx.cfg)
    weights_in_ckpt = cls.weights_in_checkpoint(ctx.cfg)

    last = None
    if resume:  # rank 0 checks the files; every rank resumes from its choice
        last = broadcast_object(ckpt.resume_point(phase_dir, model, weights=weights_in_ckpt,
                                                  shard_subdir=cls.shard_subdir(ctx.cfg), log=ctx.log)
                                if info.is_main else None)
    state = ckpt.load_trainer_state(last) if last is not None else None
    if last is not None and weights_in_ckpt:
        ckpt.load_weights(model, last)  # into the plain model, before any sharding
    model.train()
    engine = cls(model, cfg, ctx.cfg, info, device, micro_batch_size=mb, grad_accum=n_micro, phase=spec.name)
    start = 0
    if state is not None:
        engine.load(phase_dir, state)
        ckpt.set_rng_state(state["rng"])
        spec.load_state_dict(state["extra"].get("phase", {}))
        start = int(state["step"])
        ctx.metrics.truncate(spec.name, start)
        ctx.log(f"[{spec.name}] resumed from {last} at step {start}")
    else:
        ctx.metrics.truncate(spec.name, 0)

    sampler = EpochSampler(spec.num_examples(), cfg.batch_size, _seed_for(ctx.cfg.seed, spec.name))

    def evaluate() -> Dict[str, float]:
        with engine.head_gathered():  # ZeRO-3 / FSDP2: the fused eval losses need the full LM-head weight
            return spec.evaluate(engine.body)

    def save(step: int, final: bool) -> None:
        sd = engine.full_weights(final=final)  # collectives under ZeRO-3 / FSDP2
        opt_state = engine.optimizer_state()
        extra: Dict[str, Any] = {"phase": spec.state_dict(), "engine": engine.name}
        tag = engine.save_shards(phase_dir, step)
        if tag is not None:
            extra["shard_tag"] = tag
        if info.is_main:
            ckpt.save_checkpoint(phase_dir, step=step, model=model, tok=ctx.tok, optimizer_state=opt_state,
                                 scheduler=engine.sched, extra=extra, keep=cfg.keep_checkpoints, state_dict=sd,
                                 weights=weights_in_ckpt)
            if final:
                ckpt.save_model(model, ctx.tok, os.path.join(phase_dir, "final"), state_dict=sd)
        barrier()
        if info.local_rank == 0:
            ckpt.prune_shards(phase_dir, engine.shards)

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
    try:
        for step in range(start, cfg.steps):
            t0 = time.time()
            idx = shard(sampler.batch(step), rank=info.rank, world_size=info.world_size)
            batches = [spec.collate(idx[i: i + mb]) for i in range(0, len(idx), mb)]
            global_units = all_reduce_sum([float(sum(spec.units(b) for b in batches))], device)[0]
            norm = Norm(global_units, len(batches), info.world_size)
            acc: Dict[str, List[float]] = defaultdict(lambda: [0.0, 0.0])
            n_tokens = 0
            lr_now = engine.lr()
            with engine.head_gathered():  # once per step, not per micro-batch
                for i, b in enumerate(batches):
                    n_tokens += int(b["attention_mask"].sum())
                    with engine.micro_context(i, len(batches)):
                        loss, st = spec.micro(engine.module, b, norm)
                        engine.backward(loss)
                    for k, (s_, c) in st.items():
                        acc[k][0] += s_
                        acc[k][1] += c
            try:
                gn = engine.step()
            except FloatingPointError as e:
                raise FloatingPointError(f"{e} (step {step + 1})") from None
            metrics = reduce_stats(dict(acc), device)
            n_tokens, stop = all_reduce_sum([float(n_tokens), float(interrupt_requested())], device)
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
            if done or stop or (cfg.save_every > 0 and (step + 1) % cfg.save_every == 0):
                save(step + 1, final=done)
            if stop and not done:  # SIGINT / SIGTERM on any process: every process stops here
                raise TrainingInterrupted(spec.name, step + 1, os.path.join(phase_dir, f"checkpoint-{step + 1}"))
    finally:
        if bar is not None:
            bar.close()
    if start >= cfg.steps:  # resumed after the last checkpoint but before the final model was written
        save(cfg.steps, final=True)
    barrier()
    trained = engine.release()
    trained.eval()
    return trained, {"steps": cfg.steps, "resumed_from": start, "seconds": round(time.time() - t_phase, 2),
                     "last": {k: v for k, v in last_rec.items() if isinstance(v, (int, float))}}
