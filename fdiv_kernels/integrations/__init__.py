"""Drop-in integrations with existing training stacks (imported lazily; each needs its own library).

* :mod:`fdiv_kernels.integrations.transformers`: ``apply(model, divergence=...)`` patches a Hugging
  Face causal LM so that ``model(input_ids, labels=labels).loss`` is the fused f-divergence loss.
* :mod:`fdiv_kernels.integrations.trl`: ``FDivSFTTrainer`` and ``FDivDPOTrainer`` (TRL subclasses).
* ZeRO-3 and FSDP2 helpers (gathering the LM-head weight) live in :mod:`fdiv_kernels.hf`.

See ``docs/integrations.md``.
"""

__all__ = ["transformers", "trl"]
