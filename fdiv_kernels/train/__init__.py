"""Reference SFT -> DPO trainer built on the fused losses (CLI: ``fdiv-train``; docs/trainer.md).

Modules: ``config`` (YAML + overrides), ``data`` (loaders, masking, collators, sampler),
``synthetic`` (checkable tasks), ``tokenizer`` (local char tokenizer), ``modeling`` (tiny Llama,
checkpoint helpers), ``steps`` (losses of one micro-batch), ``phases``, ``trainer`` (the loop),
``engines`` (one process / DDP, DeepSpeed, FSDP2), ``checkpoint``, ``evaluate``, ``plots``,
``distributed``, ``pipeline``, ``cli``.

Layers, each using only the ones below it: the core (``fdiv_kernels``: specs, losses, ``nn``) and
:mod:`fdiv_kernels.hf` (the model plumbing: head, body, logit transform, sharded heads) ->
``steps`` (the losses of a micro-batch) and ``phases`` (what a phase collates, computes and
evaluates) -> ``trainer`` (the generic loop: it knows the :class:`~.trainer.PhaseSpec` interface
and the engines, no loss) -> ``pipeline`` and ``cli``.
"""

try:
    from .cli import main
    from .config import RunConfig, load_config
except ImportError as exc:  # yaml, transformers, ...: the [train] extra
    from ..extras import extra_error
    raise extra_error("fdiv_kernels.train", "train", exc) from exc

__all__ = ["RunConfig", "load_config", "main"]
