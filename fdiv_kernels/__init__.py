"""fdiv_kernels: fused, numerically stable f-divergence and DPO losses for LLM post-training.

Public API::

    import fdiv_kernels as fk
    out = fk.loss(hidden, weight, labels, divergence="js", ref_logp=ref, beta=0.1)
    out.loss.backward()
    logp, lse = fk.token_stats(hidden, weight, labels)  # per token, fused with the LM head
    fk.primal_loss(hidden, weight, labels, divergence="alpha", alpha=1.5)
    fk.sequence_logp(hidden, weight, labels)        # per-row sum / mean log-prob
    fk.dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type="sigmoid", divergence="kl")
    fk.DIVERGENCE_REGISTRY, fk.divergence_names("primal"), fk.DPO_LOSS_TYPES, fk.available_backends()
"""

from . import nn  # noqa: F401  (fk.nn.FusedLinearFDivLoss, ...)
from .divergences import (DIVERGENCE_REGISTRY, DIVERGENCES, Divergence, divergence_names, get_divergence,
                          register_divergence)
from .dpo import DPO_KINDS, DPO_LOSS_TYPES, DPOLossType, DPOOutput, dpo_loss
from .losses import LossOutput, SequenceLogp, loss, primal_loss, sequence_logp
from .ops import (TokenStats, TokenStatsFunction, TokenStatsParams, available_backends, register_backend, token_stats,
                  token_stats_from_logits)
from .ops.token_stats import LogpLse
from .specs import DPOSpec, FDivSpec, HeadSpec, PrimalSpec

__version__ = "0.1.0"

#: registry names by use: what :func:`primal_loss` and :func:`dpo_loss`'s ``divergence=`` accept
#: (:data:`DIVERGENCES` is what :func:`loss` accepts)
PRIMAL_DIVERGENCES = divergence_names("primal")
DPO_DIVERGENCES = divergence_names("dpo")

__all__ = [
    "DIVERGENCES", "DIVERGENCE_REGISTRY", "DPO_DIVERGENCES", "DPO_KINDS", "DPO_LOSS_TYPES", "PRIMAL_DIVERGENCES",
    "DPOLossType", "DPOOutput", "DPOSpec", "Divergence", "FDivSpec", "HeadSpec", "LogpLse", "LossOutput", "PrimalSpec",
    "SequenceLogp", "TokenStats", "TokenStatsFunction", "TokenStatsParams", "__version__", "available_backends",
    "divergence_names",
    "dpo_loss", "get_divergence", "loss", "nn", "primal_loss", "register_backend", "register_divergence",
    "sequence_logp", "token_stats", "token_stats_from_logits",
]
