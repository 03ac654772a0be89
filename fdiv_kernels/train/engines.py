"""How a phase's model runs across processes: one process or DDP, DeepSpeed ZeRO, or FSDP2.

An engine wraps the causal LM's body (:class:`~fdiv_kernels.hf.BodyWithHead`) for
training, owns the optimizer (AdamW) and the learning-rate schedule, and gives the loop:

* ``head_gathered()``: entered once per optimizer step around all its micro-batches (and around
  each evaluation). The fused loss reads the LM-head weight and never calls the head module, so
  under ZeRO-3 and FSDP2 the engine gathers the full weight here, once per step: ZeRO-3 with
  ``deepspeed.zero.GatheredParameters`` (its gradient is still reduce-scattered per micro-batch
  by ZeRO-3's hooks); FSDP2 with one ``full_tensor()`` all-gather, the micro-batches'
  gradients accumulated on the full weight and reduce-scattered once at the end of the step.
* ``micro_context(i, n)``, ``backward(loss)`` per micro-batch and ``step()`` (clipping,
  optimizer, schedule) returning the gradient norm before clipping.
* checkpoints: ``full_weights()`` / ``optimizer_state()`` (collectives; rank 0 gets the full
  tensors), ``save_shards()`` (the engine's own per-rank files, in ``<phase>/<shard_subdir>/
  step-<k>``, :meth:`LocalEngine.shard_subdir`) and ``load()`` on resume;
* ``release()``: the trained model as a plain, unsharded, hook-free module on every rank (a
  collective), which the next phase starts from (and deep-copies as its frozen reference). It
  holds the weights ``final/`` holds (DeepSpeed bf16: the 16-bit weights, not the fp32 master
  copy) in the dtypes the model had before the engine: the next phase starts exactly as a
  separate run from ``final/`` would.
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Any, Dict, Optional

import torch

from ..hf import BodyWithHead, gathered_head, torch_dtype
from .config import OptimConfig, RunConfig
from .distributed import DistInfo, no_sync, wrap_ddp
from ..errors import CheckpointError
from .modeling import rebuild_plain, tensor_aliases


def lr_lambda(cfg: OptimConfig):
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


def _optimizer(params, cfg: OptimConfig):
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.weight_decay)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))


def _check_finite(gn: float, phase: str) -> float:
    if not math.isfinite(gn):
        raise FloatingPointError(f"[{phase}] gradient norm is {gn}; stopping (lower the lr, check the data)")
    return gn


class LocalEngine:
    """One process, or DDP over torch.distributed (gloo on CPU, nccl on CUDA)."""

    name = "local"
    #: whether the accumulated ``.grad`` of ``params`` can be rescaled between micro-batches
    #: (exact log-mean-exp accumulation, :mod:`.accumulate`)
    grads_rescalable = True

    @staticmethod
    def weights_in_checkpoint(run: RunConfig) -> bool:
        """Whether ``checkpoint-<k>/model.safetensors`` holds the weights (loaded before wrapping on resume)."""
        return True

    @staticmethod
    def shard_subdir(run: RunConfig) -> Optional[str]:
        """The folder of the engine's own per-rank checkpoints (``<phase>/<it>/step-<k>``), if any."""
        return None

    def __init__(self, model: torch.nn.Module, cfg: OptimConfig, run: RunConfig, info: DistInfo,
                 device: torch.device, *, micro_batch_size: int, grad_accum: int, phase: str):
        self.model, self.cfg, self.info, self.phase = model, cfg, info, phase
        self.shards = self.shard_subdir(run)
        # DeepSpeed's bf16/fp16 casts the module in place: the hand-over restores these dtypes
        self.dtypes = {names[0]: t.dtype for names, t in tensor_aliases(model)}
        self.body = BodyWithHead(model)
        self.grad_accum = grad_accum
        self._wrap(run, device, micro_batch_size)

    def _wrap(self, run: RunConfig, device: torch.device, micro_batch_size: int) -> None:
        self.module = wrap_ddp(self.body, self.info, device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt, self.sched = _optimizer(self.params, self.cfg)

    def head_gathered(self):
        return contextlib.nullcontext()

    def micro_context(self, i: int, n: int):
        return no_sync(self.module, i < n - 1)  # DDP all-reduces on the last micro-batch only

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def lr(self) -> float:
        return self.sched.get_last_lr()[0]

    def step(self) -> float:
        gn = self._clip()
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        return gn

    def _clip(self) -> float:
        limit = self.cfg.max_grad_norm if self.cfg.max_grad_norm > 0 else math.inf
        gn = torch.nn.utils.clip_grad_norm_(self.params, limit)
        if hasattr(gn, "full_tensor"):  # FSDP2: a DTensor norm
            gn = gn.full_tensor()
        return _check_finite(float(gn), self.phase)

    # -- checkpoints ------------------------------------------------------------------------
    def full_weights(self, *, final: bool = False) -> Optional[Dict[str, torch.Tensor]]:
        """Full weights for ``save_pretrained`` (rank 0), or None to save the module's own."""
        return None

    def optimizer_state(self) -> Dict[str, Any]:
        return self.opt.state_dict()

    def save_shards(self, phase_dir: str, step: int) -> Optional[str]:
        return None

    def load(self, phase_dir: str, state: Dict[str, Any]) -> None:
        """Restore the optimizer and schedule from a checkpoint's trainer state (resume)."""
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])

    def release(self) -> torch.nn.Module:
        return self.model


class DeepSpeedEngine(LocalEngine):
    """``deepspeed.initialize`` around the body; ZeRO-1/2/3 per the JSON config."""

    name = "deepspeed"
    grads_rescalable = False  # DeepSpeed owns the gradient buffers

    @staticmethod
    def shard_subdir(run: RunConfig) -> Optional[str]:
        return "deepspeed"

    def _wrap(self, run: RunConfig, device: torch.device, micro_batch_size: int) -> None:
        from .distributed import deepspeed_initialize

        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt, self.sched = _optimizer(self.params, self.cfg)
        self.engine = deepspeed_initialize(self.body, self.opt, self.sched, run.deepspeed,
                                           micro_batch_size=micro_batch_size, grad_accum=self.grad_accum,
                                           max_grad_norm=self.cfg.max_grad_norm)
        self.module = self.engine
        self.zero3 = bool(self.engine.zero_optimization_partition_weights())

    def head_gathered(self):
        return gathered_head(self.model) if self.zero3 else contextlib.nullcontext()

    def micro_context(self, i: int, n: int):
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss * self.grad_accum)  # DeepSpeed divides by the accumulation steps itself
        self.engine.step()  # optimizer, schedule and clipping at the accumulation boundary only

    def step(self) -> float:
        return _check_finite(float(self.engine.get_global_grad_norm() or 0.0), self.phase)

    def full_weights(self, *, final: bool = False) -> Optional[Dict[str, torch.Tensor]]:
        from .distributed import deepspeed_state_dict

        return deepspeed_state_dict(self.engine)  # a collective under ZeRO-3

    def optimizer_state(self) -> Dict[str, Any]:
        return {}  # in the engine's own checkpoint (save_shards)

    def save_shards(self, phase_dir: str, step: int) -> str:
        tag = f"step-{step}"
        self.engine.save_checkpoint(os.path.join(phase_dir, self.shards), tag=tag)
        return tag

    def load(self, phase_dir: str, state: Dict[str, Any]) -> None:
        extra = state["extra"]
        tag = extra.get("shard_tag", extra.get("deepspeed_tag"))
        path, _ = self.engine.load_checkpoint(os.path.join(phase_dir, self.shards), tag=tag)
        if path is None:
            raise CheckpointError(f"{phase_dir}: DeepSpeed could not load its checkpoint {self.shards}/{tag}")
        self.sched.load_state_dict(state["scheduler"])

    def release(self) -> torch.nn.Module:
        full: Dict[str, torch.Tensor] = {}
        for names, t in tensor_aliases(self.model):
            if hasattr(t, "ds_id"):  # ZeRO-3 partitioned parameter: gather it on every rank
                import deepspeed

                with deepspeed.zero.GatheredParameters([t], modifier_rank=None):
                    full[names[0]] = t.detach().clone()
            else:  # ZeRO-1/2 parameters are full views into the engine's flat buffers
                full[names[0]] = t.detach().clone()
        self.engine.destroy()
        plain = rebuild_plain(self.model, {k: v.to(self.dtypes[k]) for k, v in full.items()})
        self.engine = self.module = self.opt = None
        return plain


class FSDPEngine(LocalEngine):
    """FSDP2: torch's ``fully_shard`` on every transformer block (the model's ``_no_split_modules``),
    on the LM head (when not tied to the input embedding) and on the body.

    ``fsdp.checkpoint``: ``full`` gathers the weights (safetensors) and the optimizer state on
    rank 0 at each checkpoint; ``sharded`` writes every rank's shards with
    ``torch.distributed.checkpoint`` to ``<phase>/fsdp/step-<k>`` (``final/`` is always full).
    """

    name = "fsdp"
    grads_rescalable = False  # every micro-batch's gradients are reduce-scattered (mixed over ranks)

    def __init__(self, model, cfg, run, info, device, **kw):
        self.mode = run.fsdp.checkpoint
        super().__init__(model, cfg, run, info, device, **kw)

    @staticmethod
    def weights_in_checkpoint(run: RunConfig) -> bool:
        return run.fsdp.checkpoint == "full"

    @staticmethod
    def shard_subdir(run: RunConfig) -> Optional[str]:
        return "fsdp" if run.fsdp.checkpoint == "sharded" else None

    def _wrap(self, run: RunConfig, device: torch.device, micro_batch_size: int) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        f = run.fsdp
        mesh = init_device_mesh(device.type, (self.info.world_size,))
        mp = (MixedPrecisionPolicy(param_dtype=torch_dtype(f.mixed_precision), reduce_dtype=torch.float32)
              if f.mixed_precision else MixedPrecisionPolicy())
        kw = dict(mesh=mesh, mp_policy=mp)
        blocks = set(getattr(self.model, "_no_split_modules", None) or ())
        for m in list(self.model.modules()):
            if type(m).__name__ in blocks:
                fully_shard(m, reshard_after_forward=f.reshard_after_forward, **kw)
        head = self.model.get_output_embeddings()
        inp = self.model.get_input_embeddings()
        self.head_tied = inp is not None and head.weight is inp.weight
        if not self.head_tied:  # its own group: never gathered by a forward, only by head_gathered()
            fully_shard(head, **kw)
        fully_shard(self.body, **kw)
        self.module = self.body
        self.params = [p for p in self.body.parameters() if p.requires_grad]
        self.opt, self.sched = _optimizer(self.params, self.cfg)

    def micro_context(self, i: int, n: int):
        return contextlib.nullcontext()  # FSDP2 reduce-scatters every micro-batch's gradients

    def head_gathered(self):
        return gathered_head(self.model)  # one all-gather per step; one reduce-scatter of its gradient

    # -- checkpoints ------------------------------------------------------------------------
    def _options(self, **kw):
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(**kw)

    def full_weights(self, *, final: bool = False) -> Optional[Dict[str, torch.Tensor]]:
        if self.mode == "sharded" and not final:
            return None
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        sd = get_model_state_dict(self.body, options=self._options(full_state_dict=True, cpu_offload=True))
        if not self.info.is_main:
            return None
        return {k[len("lm."):]: v for k, v in sd.items()}

    def optimizer_state(self) -> Dict[str, Any]:
        if self.mode == "sharded":
            return {}
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        st = get_optimizer_state_dict(self.body, self.opt, options=self._options(full_state_dict=True, cpu_offload=True))
        return st if self.info.is_main else {}

    def _sharded_state(self) -> Dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        return {"model": get_model_state_dict(self.body), "optim": get_optimizer_state_dict(self.body, self.opt)}

    def save_shards(self, phase_dir: str, step: int) -> Optional[str]:
        if self.mode != "sharded":
            return None
        import torch.distributed.checkpoint as dcp

        tag = f"step-{step}"
        dcp.save(self._sharded_state(), checkpoint_id=os.path.join(phase_dir, self.shards, tag))
        return tag

    def load(self, phase_dir: str, state: Dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        if self.mode == "sharded":
            import torch.distributed.checkpoint as dcp

            sd = self._sharded_state()
            dcp.load(sd, checkpoint_id=os.path.join(phase_dir, self.shards, state["extra"]["shard_tag"]))
            set_model_state_dict(self.body, sd["model"])
            set_optimizer_state_dict(self.body, self.opt, sd["optim"])
        else:  # weights were loaded into the plain model before sharding; the optimizer from rank 0
            set_optimizer_state_dict(self.body, self.opt, state["optimizer"] if self.info.is_main else {},
                                     options=self._options(full_state_dict=True, broadcast_from_rank0=True))
        self.sched.load_state_dict(state["scheduler"])

    def release(self) -> torch.nn.Module:
        from torch.distributed.fsdp import FSDPModule

        for m in self.body.modules():
            if isinstance(m, FSDPModule):
                m.reshard()
        full = {names[0]: (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()
                for names, t in tensor_aliases(self.model)}
        plain = rebuild_plain(self.model, {k: v.to(self.dtypes[k]) for k, v in full.items()})
        self.module = self.body = self.opt = None
        return plain


def engine_class(run: RunConfig):
    """The engine the run's config asks for: ``deepspeed``, ``fsdp.enabled`` or neither."""
    return DeepSpeedEngine if run.deepspeed else FSDPEngine if run.fsdp.enabled else LocalEngine
