"""Data parallelism: torch.distributed (DDP, gloo on CPU / nccl on CUDA) and optional DeepSpeed.

Launch with ``torchrun --nproc_per_node N -m fdiv_kernels.train ...`` (or the ``deepspeed``
launcher with ``--deepspeed examples/configs/zero2.json``). A single process needs no setup.
DeepSpeed is imported lazily; it is an optional extra (``pip install fdiv-kernels[deepspeed]``).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import warnings
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist



@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device_type: str, *, need_group: bool = False) -> DistInfo:
    """Join the process group described by ``RANK``/``WORLD_SIZE`` (torchrun, the deepspeed
    launcher); a no-op for one process unless ``need_group`` (FSDP2 needs a group even of one)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 and not (need_group and not dist.is_initialized()):
        if dist.is_available() and dist.is_initialized():
            return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(),
                            local_rank=int(os.environ.get("LOCAL_RANK", "0")))
        return DistInfo()
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if world <= 1 and "MASTER_ADDR" not in os.environ:  # a one-process group for FSDP2
            import socket

            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            dist.init_process_group(backend=backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
        else:
            dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(),
                    local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def all_reduce_sum(values: List[float], device: torch.device) -> List[float]:
    """Sum a list of floats over processes (float64 on the wire)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def all_gather_floats(value: float, device: torch.device) -> List[float]:
    """Every process's ``value``, by rank (one all-gather of one float64 each; ``[value]`` alone)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [float(value)]
    t = torch.tensor([value], dtype=torch.float64, device=device)
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return [float(x) for x in torch.cat(out).tolist()]


def reduce_stats(stats: Dict[str, List[float]], device: torch.device) -> Dict[str, float]:
    """``{name: [sum, count]}`` summed over processes -> ``sum / count`` (or ``sum`` when count is 0)."""
    names = sorted(stats)
    flat = all_reduce_sum([x for n in names for x in stats[n]], device)
    out = {}
    for i, n in enumerate(names):
        s, c = flat[2 * i], flat[2 * i + 1]
        out[n] = s / c if c > 0 else s
    return out


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def wrap_ddp(module: torch.nn.Module, info: DistInfo, device: torch.device) -> torch.nn.Module:
    """DDP around ``module`` (a :class:`~fdiv_kernels.hf.BodyWithHead`) when distributed."""
    if not info.enabled:
        return module
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [device.index if device.index is not None else info.local_rank] if device.type == "cuda" else None
    # no buffer broadcast before every forward (the buffers are equal on every rank); torch >= 2.13 calls the
    # flag forward_sync_buffers (broadcast_buffers raises a FutureWarning there)
    import inspect

    flag = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters else "broadcast_buffers"
    return DDP(module, device_ids=ids, **{flag: False})


def no_sync(module: torch.nn.Module, active: bool):
    """Skip DDP's gradient all-reduce on accumulation micro-batches (all but the last)."""
    if active and hasattr(module, "no_sync"):
        return module.no_sync()
    return contextlib.nullcontext()


def deepspeed_initialize(module: torch.nn.Module, optimizer, scheduler, config_path: str, *,
                         micro_batch_size: int, grad_accum: int, max_grad_norm: float):
    """``deepspeed.initialize`` with the batch sizes and clipping of the run filled in.

    Returns the engine; call ``engine.backward(loss)`` and ``engine.step()`` (which also steps the
    optimizer and scheduler and clips gradients). Requires the ``deepspeed`` package.
    """
    try:
        import deepspeed  # lazy: optional dependency
        import deepspeed.ops
    except ImportError as e:
        raise RuntimeError("--deepspeed needs the deepspeed package: pip install 'fdiv-kernels[deepspeed]'") from e

    # The CPU accelerator JIT-builds its shared-memory all-reduce (2-3 min) at the first
    # initialize; only inference uses it, training all-reduces through torch.distributed.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    # DeepSpeed still calls the torch.distributed names that torch 2.13 deprecates, on every collective
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    ds_cfg = read_deepspeed_config(config_path)
    ds_cfg["train_micro_batch_size_per_gpu"] = micro_batch_size
    ds_cfg["gradient_accumulation_steps"] = grad_accum
    ds_cfg.pop("train_batch_size", None)
    ds_cfg["gradient_clipping"] = max_grad_norm
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_cfg)
    return engine


def deepspeed_state_dict(engine) -> Optional[Dict[str, torch.Tensor]]:
    """Full 16-bit weights of the causal LM inside a DeepSpeed engine under ZeRO-3 (a collective:
    call on every rank; rank 0 gets the tensors), ``None`` when weights are not partitioned."""
    if not engine.zero_optimization_partition_weights():
        return None
    sd = engine._zero3_consolidated_16bit_state_dict()
    if sd is None:
        return None
    return {k[len("lm."):] if k.startswith("lm.") else k: v for k, v in sd.items()}


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def local_device(name: str, info: Optional[DistInfo] = None) -> torch.device:
    """``auto`` -> cuda:<local_rank> when CUDA is available, else cpu."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        idx = info.local_rank if info else 0
        torch.cuda.set_device(idx)
        return torch.device("cuda", idx)
    return torch.device(name)


def read_deepspeed_config(path: str) -> Dict[str, Any]:
    """The DeepSpeed JSON config at ``path`` (a mapping)."""
    with open(path, encoding="utf-8") as f:
        cfg = json.load(f)
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: a DeepSpeed config must be a JSON object")
    return cfg
