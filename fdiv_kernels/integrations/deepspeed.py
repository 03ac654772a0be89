"""DeepSpeed ZeRO-3 helpers for fused heads that read ``lm_head.weight`` directly.

Under ZeRO-3 every parameter is partitioned (its ``.data`` is empty) and is only gathered by the
hooks DeepSpeed puts on the *owning* module's forward/backward. A fused loss never calls the head
module, so it must (1) gather the weight itself for the forward (:func:`gathered`) and (2) tell
DeepSpeed that the model's top-level forward/backward uses the head weight
(:func:`register_external`), so that the weight is gathered again when the backward recomputes
the logit tiles and its gradient is reduce-scattered as usual.

``deepspeed`` is imported lazily, only when a parameter carries ZeRO-3 metadata (``ds_id``).
:func:`gathered` runs against real ZeRO-3 engines in the reference trainer's tests (2 gloo ranks,
``tests/test_train_distributed.py``); :func:`register_external` (used by the transformers patch)
is unit-tested with fake parameters.
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Optional

import torch


def is_zero3_param(p: Optional[torch.Tensor]) -> bool:
    """True for a parameter managed by DeepSpeed ZeRO-3 (it carries ``ds_id``)."""
    return p is not None and hasattr(p, "ds_id")


def _needs_gather(p: torch.Tensor) -> bool:
    status = getattr(p, "ds_status", None)
    return getattr(status, "name", str(status)) != "AVAILABLE"


def gathered(*params: Optional[torch.Tensor]):
    """Context manager gathering the ZeRO-3 partitioned ``params`` (``None`` entries ignored).

    A null context when no parameter is ZeRO-3 managed or all are already gathered (e.g. a head
    tied to the input embedding, gathered by the embedding's own hook). Duplicates (tied weights)
    are gathered once.
    """
    todo = {id(p): p for p in params if is_zero3_param(p) and _needs_gather(p)}
    if not todo:
        return contextlib.nullcontext()
    import deepspeed  # lazy: only reached with ZeRO-3 parameters

    return deepspeed.zero.GatheredParameters(list(todo.values()), modifier_rank=None)


def register_external(module: torch.nn.Module, params: Iterable[Optional[torch.Tensor]]) -> int:
    """Register ZeRO-3 ``params`` as external parameters of ``module`` (``deepspeed.zero.register_external_parameter``).

    Returns the number registered (0 when none is ZeRO-3 managed; ``deepspeed`` is then not imported).
    """
    todo = [p for p in params if is_zero3_param(p)]
    if not todo:
        return 0
    import deepspeed

    for p in {id(p): p for p in todo}.values():
        deepspeed.zero.register_external_parameter(module, p)
    return len(todo)


def full_shape(p: torch.Tensor) -> torch.Size:
    """The logical shape of ``p`` (``ds_shape`` for a partitioned ZeRO-3 parameter)."""
    return torch.Size(getattr(p, "ds_shape", p.shape))
