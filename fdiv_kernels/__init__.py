"""fdiv_kernels: fused, numerically stable f-divergence and DPO losses for LLM post-training.

Public API::

    import fdiv_kernels as fk
    out = fk.loss(hidden, weight, labels, divergence="js", ref_logp=ref, beta=0.1)
    out.loss.backward()
    logp, lse = fk.token_stats(hidden, weight, labels)  # per token, fused with the LM head
    fk.primal_loss(hidden, weight, labels, divergence="alpha", alpha=1.5)
    fk.sequence_logp(hidden, weight, labels)        # per-row sum / mean log-prob
    fk.dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type="sigmoid", divergence="kl")
    fk.dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0],
                chosen_tokens=n)                 # TRL's combinations; "sft": the chosen answers' NLL
    fk.kto_loss(s, ref, desirable=label, kl=z)   # KTO; fk.nn.FusedLinearKTOLoss, ...CPOLoss, ...ORPOLoss fused
    fk.distill_loss(hidden, weight, labels, teacher_hidden=th, teacher_weight=tw, divergence="js", beta=0.5)
    fk.loss_from_spec(fk.FDivSpec("kl", beta=0.1), hidden, weight, labels, head=fk.HeadSpec(backend="cpu"))
    fk.nn.FusedLinearFDivLoss, fk.nn.FusedLinearDPOLoss, fk.nn.FDivLoss, fk.nn.FusedLinearDistillLoss
    fk.DIVERGENCE_REGISTRY, fk.divergence_names("primal"), fk.DPO_LOSS_TYPES, fk.available_backends()
    with fk.config(check_finite=False): ...          # the knobs (fdiv_kernels.knobs)

The layers below the API (``docs/design.md``): :mod:`fdiv_kernels.knobs` and
:mod:`fdiv_kernels.checks`; the math (:mod:`fdiv_kernels.formulas`); the loss protocol
(:mod:`fdiv_kernels.specs`); the backends (:mod:`fdiv_kernels.kernels`); the autograd functions
(:mod:`fdiv_kernels.autograd`); the ``torch.compile`` ops (:mod:`fdiv_kernels.compiled`); the entry
points (:mod:`fdiv_kernels.api`, :mod:`fdiv_kernels.nn`).
"""

from . import nn  # noqa: F401  (fk.nn.FusedLinearFDivLoss, ...)
from .api import (DistillOutput, DPOOutput, KTOOutput, LossOutput, SequenceLogp, distill_from_spec, distill_loss,
                  dpo_loss, kto_loss, loss, loss_from_spec, primal_loss, sequence_logp, shift_for_causal_lm, token_stats,
                  token_stats_from_logits)
from .autograd.token_stats import LogpLse, TokenStats, TokenStatsFunction, TokenStatsParams
from .formulas.divergences import (DIVERGENCE_REGISTRY, DIVERGENCES, Divergence, divergence_names, get_divergence,
                                   register_divergence)
from .formulas.preference import DPO_LOSS_TYPES, KTO_LOSS_TYPES, TRL_F_DIVERGENCES, DPOLossType
from .formulas.primal import PrimalLoss
from .kernels import Backend, available_backends, register_backend
from .knobs import config
from .specs import (CPO_LOSS_TYPES, DistillSpec, DPOSpec, FDivSpec, HeadSpec, KTOSpec, LogSumExpAccumulator, LossSpec,
                    PrimalSpec, VocabShard, cpo_spec, orpo_spec)

__version__ = "0.1.0"

#: registry names by use: what :func:`primal_loss` and :func:`dpo_loss`'s ``divergence=`` accept
#: (:data:`DIVERGENCES` is what :func:`loss` accepts)
PRIMAL_DIVERGENCES = divergence_names("primal")
DPO_DIVERGENCES = divergence_names("dpo")
#: what :func:`distill_loss`'s ``divergence=`` accepts
DISTILL_DIVERGENCES = divergence_names("distill")

__all__ = [
    "CPO_LOSS_TYPES", "DISTILL_DIVERGENCES", "DIVERGENCES", "DIVERGENCE_REGISTRY", "DPO_DIVERGENCES", "DPO_LOSS_TYPES",
    "KTO_LOSS_TYPES", "PRIMAL_DIVERGENCES", "TRL_F_DIVERGENCES", "Backend", "DPOLossType", "DPOOutput", "DPOSpec",
    "DistillOutput", "DistillSpec", "Divergence", "FDivSpec", "HeadSpec", "KTOOutput", "KTOSpec", "LogSumExpAccumulator",
    "LogpLse", "LossOutput", "LossSpec", "PrimalLoss", "PrimalSpec", "SequenceLogp", "TokenStats", "TokenStatsFunction",
    "TokenStatsParams", "__version__", "available_backends", "config", "cpo_spec", "distill_from_spec", "distill_loss",
    "divergence_names", "dpo_loss", "get_divergence", "kto_loss", "loss", "loss_from_spec", "nn", "orpo_spec",
    "primal_loss", "register_backend", "register_divergence", "sequence_logp", "shift_for_causal_lm", "token_stats",
    "token_stats_from_logits", "VocabShard",
]
