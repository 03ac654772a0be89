"""DeepSpeed ZeRO-3 helpers for fused heads that read ``lm_head.weight`` directly.

Under ZeRO-3 every parameter is partitioned (its ``.data`` is empty) and is only gathered by the
hooks DeepSpeed puts on the *owning* module's forward/backward. A fused loss never calls the head
module, so it must (1) gather the weight itself for the forward (:func:`gathered`) and (2) tell
DeepSpeed that the model's top-level forward/backward uses the head weight
(:func:`register_external`), so that the weight is gathered again when the backward recomputes
the logit tiles and its gradient is reduce-scattered as usual.

The helpers live in :mod:`fdiv_kernels.hf` (shared with the trainer); this module keeps their
names. ``deepspeed`` is imported lazily, only when a parameter carries ZeRO-3 metadata
(``ds_id``). :func:`gathered` runs against real ZeRO-3 engines in the reference trainer's tests
(2 gloo ranks, ``tests/test_train_distributed.py``); :func:`register_external` (used by the
transformers patch) is unit-tested with fake parameters.
"""

from __future__ import annotations

from ..hf import full_shape, gathered, is_zero3_param, register_external

__all__ = ["full_shape", "gathered", "is_zero3_param", "register_external"]
