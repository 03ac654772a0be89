"""Reference SFT -> DPO trainer built on the fused losses (CLI: ``fdiv-train``; docs/trainer.md).

Modules: ``config`` (YAML + overrides), ``data`` (loaders, masking, collators, sampler),
``synthetic`` (checkable tasks), ``tokenizer`` (local char tokenizer), ``modeling`` (tiny Llama,
HF loading, hidden-state / LM-head helpers), ``steps`` (losses of one micro-batch), ``phases``,
``trainer`` (the loop), ``engines`` (one process / DDP, DeepSpeed, FSDP2), ``checkpoint``, ``evaluate``,
``plots``, ``distributed``, ``pipeline``, ``cli``.
"""

from .cli import main
from .config import RunConfig, load_config

__all__ = ["RunConfig", "load_config", "main"]
