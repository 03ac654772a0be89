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
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Sequence, Tuple

import torch

from . import checkpoint as ckpt
from .accumulate import MicroLoss, StepBackward
from .config import OptimConfig, RunConfig
from .sampling import EpochSampler, shard
from .distributed import DistInfo, all_reduce_sum, barrier, broadcast_object, reduce_stats
from .engines import engine_class
from ..errors import TrainingInterrupted
from .interrupt import interrupt_requested

# name -> (sum, count), summed over micro-batches and processes; reported as sum / count, or as
# the plain sum when count is 0
Stats = Dict[str, Tuple[float, float]]

#: metrics shown next to the progress bar, when a step has them
PROGRESS_KEYS = ("loss", "nll", "accuracy", "align_accuracy")
#: a phase's data order: ``seed * SEED_STRIDE + crc32(phase) % SEED_PHASES`` seeds its sampler
#: (fixed: a resumed run, or a run of another version, replays the same batches)
SEED_STRIDE, SEED_PHASES = 7919, 100_000


@dataclass
class Norm:
    """How a micro-batch's loss is scaled (:meth:`PhaseSpec.micro`): the global count of the step's
    units (tokens, rows or pairs, summed over processes), the number of micro-batches on this
    process, and the world size; ``counts``: the global counts of the phase's other units
    (:meth:`PhaseSpec.counts`, e.g. SFT's ``tokens`` and ``rows``). Summing the scaled losses over
    micro-batches and averaging over processes gives the loss of the global batch."""

    global_count: float
    num_micro: int
    world_size: int
    counts: Dict[str, float] = field(default_factory=dict)

    def count(self, unit: str = "") -> float:
        """The global count of ``unit`` (the phase's own units when empty)."""
        return self.counts[unit] if unit else self.global_count

    def sum_scale(self, unit: str = "") -> float:
        """For a loss that is a sum over units: ``world_size / global_count`` (of ``unit``)."""
        return self.world_size / max(self.count(unit), 1.0)

    def mean_scale(self) -> float:
        """For a micro-batch mean (not a sum over units): ``1 / num_micro``."""
        return 1.0 / self.num_micro


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

    def counts(self, batch: Dict[str, Any]) -> Dict[str, float]:
        """Other units the micro-batch's loss terms divide by (summed over the step into :attr:`Norm.counts`)."""
        return {}

    def micro(self, module, batch: Dict[str, Any], norm: Norm) -> Tuple[MicroLoss, Stats]:
        """The micro-batch's loss (a tensor, or a :class:`~.accumulate.LogMeanExpLoss`) and statistics."""
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
    return seed * SEED_STRIDE + zlib.crc32(phase.encode()) % SEED_PHASES


def train_phase(ctx: RunContext, spec: PhaseSpec, model: torch.nn.Module, *,
                resume: bool) -> Tuple[torch.nn.Module, Dict[str, Any]]:
    """Train ``model`` for ``spec.cfg.steps`` optimizer steps; returns ``(trained model, summary)``.

    The trained model is ``model`` itself (one process, DDP) or, after DeepSpeed / FSDP2, a plain
    rebuilt model holding the gathered weights (:meth:`~.engines.LocalEngine.release`).
    Checkpoints go to ``run_dir/<phase>/checkpoint-<step>`` (every ``save_every`` steps, at the
    end, and on SIGINT / SIGTERM, after which :class:`TrainingInterrupted` is raised) and the
    result to ``run_dir/<phase>/final``. With ``resume`` the newest checkpoint that passes its
    checks is loaded (weights, optimizer, scheduler, RNG, phase state, step); damaged newer ones
    are reported and skipped.
    """
    return _PhaseRun(ctx, spec, model).run(resume=resume)


class _PhaseRun:
    """One :func:`train_phase`: resume, wrap, then step; evaluation and checkpoints in between."""

    def __init__(self, ctx: RunContext, spec: PhaseSpec, model: torch.nn.Module):
        self.ctx, self.spec, self.model, self.cfg = ctx, spec, model, spec.cfg
        self.phase_dir = os.path.join(ctx.run_dir, spec.name)
        os.makedirs(self.phase_dir, exist_ok=True)
        self.mb, self.n_micro = micro_batch_size(self.cfg, ctx.dist.world_size)
        self.engine_cls = engine_class(ctx.cfg)
        self.weights_in_ckpt = self.engine_cls.weights_in_checkpoint(ctx.cfg)
        self.engine = None

    # -- resume, wrap ---------------------------------------------------------------------------
    def _resume_point(self) -> Tuple[Any, Any]:
        """``(checkpoint dir, trainer state)`` to resume from, ``(None, None)`` for a fresh start.
        Rank 0 checks the files; every rank resumes from its choice. The weights go into the plain
        model here, before any sharding (engines whose checkpoints hold them)."""
        ctx = self.ctx
        last = broadcast_object(ckpt.resume_point(self.phase_dir, self.model, weights=self.weights_in_ckpt,
                                                  shard_subdir=self.engine_cls.shard_subdir(ctx.cfg), log=ctx.log)
                                if ctx.dist.is_main else None)
        if last is None:
            return None, None
        if self.weights_in_ckpt:
            ckpt.load_weights(self.model, last)
        return last, ckpt.load_trainer_state(last)

    def _wrap(self) -> None:
        self.model.train()
        self.engine = self.engine_cls(self.model, self.cfg, self.ctx.cfg, self.ctx.dist, self.ctx.device,
                                      micro_batch_size=self.mb, grad_accum=self.n_micro, phase=self.spec.name)

    def _restore(self, last, state) -> int:
        """Load the engine (optimizer, schedule, shards), RNG and phase state; the first step to run."""
        name = self.spec.name
        if state is None:
            self.ctx.metrics.truncate(name, 0)
            return 0
        self.engine.load(self.phase_dir, state)
        ckpt.set_rng_state(state["rng"])
        self.spec.load_state_dict(state["extra"].get("phase", {}))
        start = int(state["step"])
        self.ctx.metrics.truncate(name, start)
        self.ctx.log(f"[{name}] resumed from {last} at step {start}")
        return start

    # -- evaluation and checkpoints ------------------------------------------------------------
    def evaluate(self) -> Dict[str, float]:
        with self.engine.head_gathered():  # ZeRO-3 / FSDP2: the fused eval losses need the full LM-head weight
            return self.spec.evaluate(self.engine.body)

    def save(self, step: int, final: bool) -> None:
        ctx, engine = self.ctx, self.engine
        sd = engine.full_weights(final=final)  # collectives under ZeRO-3 / FSDP2
        opt_state = engine.optimizer_state()
        extra: Dict[str, Any] = {"phase": self.spec.state_dict(), "engine": engine.name}
        tag = engine.save_shards(self.phase_dir, step)
        if tag is not None:
            extra["shard_tag"] = tag
        if ctx.dist.is_main:
            ckpt.save_checkpoint(self.phase_dir, step=step, model=self.model, tok=ctx.tok, optimizer_state=opt_state,
                                 scheduler=engine.sched, extra=extra, keep=self.cfg.keep_checkpoints, state_dict=sd,
                                 weights=self.weights_in_ckpt)
            if final:
                ckpt.save_model(self.model, ctx.tok, os.path.join(self.phase_dir, "final"), state_dict=sd)
        barrier()
        if ctx.dist.local_rank == 0:
            ckpt.prune_shards(self.phase_dir, engine.shards)

    # -- one optimizer step ----------------------------------------------------------------------
    def step(self, step: int, sampler: EpochSampler) -> Tuple[Dict[str, Any], bool]:
        """Run optimizer step ``step`` (0-based): ``(its metrics record, whether a stop was asked)``."""
        spec, engine, info, device, mb = self.spec, self.engine, self.ctx.dist, self.ctx.device, self.mb
        t0 = time.time()
        idx = shard(sampler.batch(step), rank=info.rank, world_size=info.world_size)
        batches = [spec.collate(idx[i: i + mb]) for i in range(0, len(idx), mb)]
        norm = self._norm(batches)
        acc: Dict[str, List[float]] = defaultdict(lambda: [0.0, 0.0])
        n_tokens = 0
        lr_now = engine.lr()
        backward = StepBackward(engine, num_micro=len(batches), world_size=info.world_size, device=device)
        with engine.head_gathered():  # once per step, not per micro-batch
            for i, b in enumerate(batches):
                n_tokens += int(b["attention_mask"].sum())
                with engine.micro_context(i, len(batches)):
                    loss, st = spec.micro(engine.module, b, norm)
                    backward(i, loss)
                for k, (s_, c) in st.items():
                    acc[k][0] += s_
                    acc[k][1] += c
        try:
            gn = engine.step()
        except FloatingPointError as e:
            raise FloatingPointError(f"{e} (step {step + 1})") from None
        metrics = reduce_stats(dict(acc), device)
        if backward.lme:
            metrics["loss"] = metrics.get("loss", 0.0) + backward.log_mean_exp()
        n_tokens, stop = all_reduce_sum([float(n_tokens), float(interrupt_requested())], device)
        metrics.update(spec.after_step(metrics))
        dt = time.time() - t0
        rec = {"phase": spec.name, "step": step + 1, **metrics, "grad_norm": gn, "lr": lr_now,
               "tokens_per_s": n_tokens / max(dt, 1e-9), "step_time_s": dt}
        return rec, bool(stop)

    def _norm(self, batches: List[Dict[str, Any]]) -> Norm:
        """The step's :class:`Norm`: its units and other counts summed over processes (one all-reduce)."""
        spec = self.spec
        counts: Dict[str, float] = defaultdict(float)
        for b in batches:
            for k, v in spec.counts(b).items():
                counts[k] += float(v)
        names = sorted(counts)
        total = all_reduce_sum([float(sum(spec.units(b) for b in batches))] + [counts[k] for k in names],
                               self.ctx.device)
        return Norm(total[0], len(batches), self.ctx.dist.world_size, dict(zip(names, total[1:])))

    def _log(self, rec: Dict[str, Any], bar) -> None:
        cfg, step = self.cfg, rec["step"]
        if cfg.eval_every > 0 and (step % cfg.eval_every == 0 or step == cfg.steps):
            rec.update(self.evaluate())
        if not math.isfinite(rec.get("loss", 0.0)):
            raise FloatingPointError(f"[{self.spec.name}] step {step}: loss is {rec['loss']}")
        if step % max(cfg.log_every, 1) == 0 or step == cfg.steps or "align_accuracy" in rec:
            self.ctx.metrics.write(rec)
        if bar is not None:
            bar.update(1)
            bar.set_postfix({k: f"{rec[k]:.3g}" for k in PROGRESS_KEYS if k in rec})

    # -- the phase -------------------------------------------------------------------------------
    def run(self, *, resume: bool) -> Tuple[torch.nn.Module, Dict[str, Any]]:
        ctx, cfg, name = self.ctx, self.cfg, self.spec.name
        last, state = self._resume_point() if resume else (None, None)
        self._wrap()
        start = self._restore(last, state)
        sampler = EpochSampler(self.spec.num_examples(), cfg.batch_size, _seed_for(ctx.cfg.seed, name))
        if start == 0 and cfg.eval_every > 0:
            ev = self.evaluate()
            if ev:
                ctx.metrics.write({"phase": name, "step": 0, **ev})
        bar = None
        if ctx.dist.is_main and ctx.cfg.progress and start < cfg.steps:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.steps, initial=start, desc=name, dynamic_ncols=True, leave=True)
        t_phase = time.time()
        last_rec: Dict[str, Any] = {}
        try:
            for step in range(start, cfg.steps):
                last_rec, stop = self.step(step, sampler)
                self._log(last_rec, bar)
                done = step + 1 == cfg.steps
                if done or stop or (cfg.save_every > 0 and (step + 1) % cfg.save_every == 0):
                    self.save(step + 1, final=done)
                if stop and not done:  # SIGINT / SIGTERM on any process: every process stops here
                    raise TrainingInterrupted(name, step + 1, os.path.join(self.phase_dir, f"checkpoint-{step + 1}"))
        finally:
            if bar is not None:
                bar.close()
        if start >= cfg.steps:  # resumed after the last checkpoint but before the final model was written
            self.save(cfg.steps, final=True)
        barrier()
        trained = self.engine.release()
        trained.eval()
        return trained, {"steps": cfg.steps, "resumed_from": start, "seconds": round(time.time() - t_phase, 2),
                         "last": {k: v for k, v in last_rec.items() if isinstance(v, (int, float))}}
