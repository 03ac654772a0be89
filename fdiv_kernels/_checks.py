"""Input validation shared by the public entry points.

Every check raises ``ValueError`` (bad values or shapes) or ``TypeError`` (bad dtypes) with a
message that names the argument, what was expected and what was given.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def check_choice(name: str, value: str, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not supported; choose one of {sorted(choices)}")


def check_beta(beta: float) -> None:
    try:
        ok = math.isfinite(float(beta)) and float(beta) > 0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"beta must be a finite number > 0, got {beta!r}")


def check_floating(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (float32, bfloat16, float16 or float64), got {t.dtype}")


def check_labels(labels: torch.Tensor, vocab_size: int, ignore_index: int) -> None:
    """Labels are integers in [0, vocab_size) or equal to ``ignore_index``."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype not in _INT_DTYPES:
        raise TypeError(f"labels must be an integer tensor (int32 or int64), got {labels.dtype}")
    if labels.numel() == 0:
        return
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab_size))
    if bool(bad.any()):
        pos = tuple(int(i) for i in bad.nonzero()[0].tolist())
        value = int(labels[pos])
        raise ValueError(
            f"labels must lie in [0, {vocab_size}) or equal ignore_index={ignore_index}; "
            f"found {value} at position {pos}"
        )


def check_same_device(**tensors: Optional[torch.Tensor]) -> None:
    present = {k: v for k, v in tensors.items() if v is not None}
    devices = {k: v.device for k, v in present.items()}
    if len(set(devices.values())) > 1:
        desc = ", ".join(f"{k} on {d}" for k, d in devices.items())
        raise ValueError(f"all tensors must be on one device; got {desc}")


def check_head(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
               bias: Optional[torch.Tensor], ignore_index: int,
               softcap: Optional[float], temperature: float) -> None:
    """Validate the inputs of a fused LM-head call (``token_stats`` and everything built on it)."""
    check_floating("hidden", hidden)
    check_floating("weight", weight)
    if weight.dim() != 2:
        raise ValueError(f"weight must have shape [V, H], got {tuple(weight.shape)}")
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden's last dimension must equal weight's H: hidden {tuple(hidden.shape)}, "
            f"weight {tuple(weight.shape)} (expected weight [V, H] as in nn.Linear(H, V).weight)"
        )
    if hidden.dtype != weight.dtype:
        raise TypeError(f"hidden and weight must share a dtype, got {hidden.dtype} and {weight.dtype}")
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"labels must have hidden's leading shape {tuple(hidden.shape[:-1])}, got {tuple(labels.shape)}"
        )
    if bias is not None:
        check_floating("bias", bias)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias must have shape [V]=({weight.shape[0]},), got {tuple(bias.shape)}")
    check_same_device(hidden=hidden, weight=weight, labels=labels, bias=bias)
    check_scalars(softcap, temperature)
    check_labels(labels, weight.shape[0], ignore_index)


def check_scalars(softcap: Optional[float], temperature: float) -> None:
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be None or > 0, got {softcap}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
