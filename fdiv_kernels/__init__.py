"""fdiv_kernels: fused, numerically stable f-divergence and DPO losses for LLM post-training.

Public API::

    import fdiv_kernels as fk
    out = fk.loss(hidden, weight, labels, divergence="js", ref_logp=ref, beta=0.1)
    out.loss.backward()
    fk.token_stats(hidden, weight, labels)          # (logp, lse) per token, fused with the LM head
    fk.sequence_logp(hidden, weight, labels)        # per-row sum / mean log-prob
    fk.dpo_loss(pc, pr, rc, rr, beta=0.1, kind="sigmoid")
    fk.DIVERGENCES, fk.available_backends()
"""

from .divergences import DIVERGENCES, Divergence, get_divergence, register_divergence
from .dpo import DPO_KINDS, DPOOutput, dpo_loss
from .losses import LossOutput, SequenceLogp, loss, sequence_logp
from . import nn  # noqa: F401  (fk.nn.FusedLinearFDivLoss, ...)
from .ops import (TokenStats, TokenStatsFunction, TokenStatsParams, available_backends, register_backend, token_stats,
                  token_stats_from_logits)

__version__ = "0.1.0"

__all__ = [
    "DIVERGENCES", "DPO_KINDS", "DPOOutput", "Divergence", "LossOutput", "SequenceLogp", "TokenStats",
    "TokenStatsFunction", "TokenStatsParams", "available_backends", "nn", "dpo_loss", "get_divergence", "loss", "register_backend",
    "register_divergence", "sequence_logp", "token_stats", "token_stats_from_logits", "__version__",
]
