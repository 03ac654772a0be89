"""The loss computations of one micro-batch of SFT, DPO, pretraining and their metrics.

Every function runs the model body to the last hidden states and calls the fused primitive
(:func:`fdiv_kernels.loss`, :func:`fdiv_kernels.sequence_logp`, :func:`fdiv_kernels.token_stats`)
with the LM-head weight: the ``[B, T, V]`` logits are never formed.

Batches come from :func:`fdiv_kernels.train.data.collate` (unshifted ``labels``); position ``t``
of the hidden states predicts ``labels[t + 1]``.

Normalisation. A micro-batch returns the loss to back-propagate already scaled so that summing
over the micro-batches of a step and averaging over processes (DDP) gives the loss of the whole
global batch: ``sum_over_tokens(loss) / global_tokens * world_size`` (rows/pairs for sequence
level and DPO). Divergences with a batch-level aggregate (``kl``, ``squared_hellinger``: log mean
exp), ``values="free"`` and ``z_loss`` are not sums over tokens; for them each micro-batch's mean
loss is weighted by ``1 / num_micro_batches`` (exact for one micro-batch on one process).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

import fdiv_kernels as fk

from .config import DPOConfig, MixDPOConfig, SFTConfig
from .data import IGNORE_INDEX
from .modeling import hidden_states, lm_head

# name -> (sum, count), summed over micro-batches and processes; reported as sum / count, or as
# the plain sum when count is 0
Stats = Dict[str, Tuple[float, float]]


@dataclass
class Norm:
    """How to scale a micro-batch loss: global count of the step's units (tokens, rows or pairs),
    number of micro-batches on this process, and the world size."""

    global_count: float
    num_micro: int
    world_size: int

    def sum_scale(self) -> float:
        return self.world_size / max(self.global_count, 1.0)

    def mean_scale(self) -> float:
        return 1.0 / self.num_micro


def shifted(batch: Dict[str, torch.Tensor]) -> torch.Tensor:
    """Labels aligned with the hidden states: ``labels[:, 1:]`` ``[B, T-1]``."""
    return batch["labels"][:, 1:]


def _head_inputs(model, batch):
    h = hidden_states(model, batch["input_ids"], batch["attention_mask"])[:, :-1]
    w, b, cap = lm_head(model)
    if w.dtype != h.dtype:  # FSDP2 mixed precision: a gathered fp32 head, a bf16 body
        w, b = w.to(h.dtype), (b.to(h.dtype) if b is not None else None)
    return h, w, b, cap


def token_logp(model, batch, *, backend: str = "auto") -> fk.TokenStats:
    """Per-token ``(logp, lse)`` ``[B, T-1]`` of the shifted labels (0 where ignored)."""
    h, w, b, cap = _head_inputs(model, batch)
    return fk.token_stats(h, w, shifted(batch), bias=b, softcap=cap, backend=backend)


@torch.no_grad()
def reference_token_logp(ref_model, batch, *, backend: str = "auto") -> torch.Tensor:
    """Reference log-probs ``[B, T-1]`` under ``no_grad`` (fused primitive)."""
    return token_logp(ref_model, batch, backend=backend).logp.detach()


def count_tokens(batch) -> int:
    return int((shifted(batch) != IGNORE_INDEX).sum())


def sft_decomposable(cfg: SFTConfig) -> bool:
    """True when the SFT loss is a plain sum over tokens/rows (exact across micro-batches)."""
    return fk.get_divergence(cfg.divergence).aggregate == "mean" and cfg.values != "free" and cfg.z_loss == 0


def sft_units(batch, cfg: SFTConfig) -> int:
    """Units the SFT loss averages over: supervised tokens (token level) or non-empty rows."""
    lab = shifted(batch) != IGNORE_INDEX
    return int(lab.sum()) if cfg.level == "token" else int(lab.any(dim=1).sum())


def sft_micro(model, batch, *, cfg: SFTConfig, ref_logp: Optional[torch.Tensor], norm: Norm,
              backend: str = "auto") -> Tuple[torch.Tensor, Stats]:
    """SFT loss of one micro-batch with :func:`fdiv_kernels.loss` and its statistics.

    Stats: ``loss``; ``nll`` (mean -logp per supervised token); ``value_s0`` (mean lse at each
    row's first response position, the paper's V(s0)); ``logratio_ref`` (mean logp - ref_logp per
    token, a sample estimate of the per-token KL(pi || ref) on the data's answers).
    """
    h, w, b, cap = _head_inputs(model, batch)
    labels = shifted(batch)
    exact = sft_decomposable(cfg)
    out = fk.loss(h, w, labels, divergence=cfg.divergence, ref_logp=ref_logp, beta=cfg.beta, level=cfg.level,
                  values=cfg.values, z_loss=cfg.z_loss, length_normalize=cfg.length_normalize,
                  reduction="sum" if exact else "mean", backend=backend, bias=b, softcap=cap)
    loss = out.loss * (norm.sum_scale() if exact else norm.mean_scale())
    mask = out.mask
    ntok = float(mask.sum())
    rows = mask.any(dim=1)
    stats: Stats = {
        "loss": (float(loss.detach()) / norm.world_size, 0.0),
        "nll": (float(-(out.logp.detach() * mask).sum()), ntok),
        "value_s0": (float(out.value_s0.detach()[rows].sum()), float(rows.sum())),
        "tokens": (ntok, 0.0),
    }
    if ref_logp is not None:
        stats["logratio_ref"] = (float(((out.logp.detach() - ref_logp) * mask).sum()), ntok)
    return loss, stats


def pretrain_micro(model, batch, *, norm: Norm, backend: str = "auto") -> Tuple[torch.Tensor, Stats]:
    """Next-token NLL (sum over tokens / global tokens) for pretraining."""
    st = token_logp(model, batch, backend=backend)
    mask = shifted(batch) != IGNORE_INDEX
    nll_sum = -(st.logp * mask).sum()
    loss = nll_sum * norm.sum_scale()
    ntok = float(mask.sum())
    return loss, {"loss": (float(loss.detach()) / norm.world_size, 0.0),
                  "nll": (float(nll_sum.detach()), ntok), "tokens": (ntok, 0.0)}


def pair_logps(model, batch, *, backend: str = "auto") -> fk.SequenceLogp:
    """Per-row ``(sum, mean, count)`` of label log-probs of a ``[2B, T]`` pair batch."""
    h, w, b, cap = _head_inputs(model, batch)
    return fk.sequence_logp(h, w, shifted(batch), bias=b, softcap=cap, backend=backend)


@torch.no_grad()
def reference_pair_logps(ref_model, batch, *, backend: str = "auto") -> fk.SequenceLogp:
    s = pair_logps(ref_model, batch, backend=backend)
    return fk.SequenceLogp(s.sum.detach(), s.mean.detach(), s.count)


def uses_mean_logp(kind: str) -> bool:
    """IPO and SimPO are fed length-averaged log-probs (TRL's convention)."""
    return kind in ("ipo", "simpo")


def dpo_from_logps(policy: fk.SequenceLogp, ref: Optional[fk.SequenceLogp], *, kind: str, beta: float,
                   gamma: float = 0.0, label_smoothing: float = 0.0) -> fk.DPOOutput:
    """``fk.dpo_loss`` on a pair batch's sequence log-probs (first half chosen, second rejected)."""
    sel = (lambda s: s.mean) if uses_mean_logp(kind) else (lambda s: s.sum)
    p = sel(policy)
    b = p.shape[0] // 2
    rc = rr = None
    if kind != "simpo":
        if ref is None:
            raise ValueError(f"DPO kind {kind!r} needs reference log-probs")
        r = sel(ref)
        rc, rr = r[:b], r[b:]
    return fk.dpo_loss(p[:b], p[b:], rc, rr, beta=beta, kind=kind, label_smoothing=label_smoothing, gamma=gamma)


def dpo_micro(model, batch, *, cfg: DPOConfig, ref: Optional[fk.SequenceLogp], norm: Norm,
              backend: str = "auto") -> Tuple[torch.Tensor, Stats]:
    """DPO-family loss of a micro-batch of pairs (sum over pairs / global pairs).

    With ``cfg.sft_weight > 0`` adds ``sft_weight * NLL`` of the chosen answers (per token).
    Stats: ``loss``, ``dpo_loss``, ``accuracy``, ``margin``, ``chosen_reward``, ``rejected_reward``,
    ``logp_chosen`` (mean per-token log-prob of the chosen answers), ``tokens``.
    """
    pol = pair_logps(model, batch, backend=backend)
    out = dpo_from_logps(pol, ref, kind=cfg.kind, beta=cfg.beta, gamma=cfg.gamma,
                         label_smoothing=cfg.label_smoothing)
    b = pol.sum.shape[0] // 2
    loss = out.losses.sum() * norm.sum_scale()
    nll_c = -pol.sum[:b].sum() / pol.count[:b].sum().clamp(min=1)
    if cfg.sft_weight > 0:
        loss = loss + cfg.sft_weight * nll_c * norm.mean_scale()
    ntok = float(pol.count.sum())
    stats: Stats = {
        "loss": (float(loss.detach()) / norm.world_size, 0.0),
        "dpo_loss": (float(out.losses.detach().sum()), float(b)),
        "accuracy": (float((out.chosen_rewards > out.rejected_rewards).float().sum()), float(b)),
        "margin": (float((out.chosen_rewards - out.rejected_rewards).sum()), float(b)),
        "chosen_reward": (float(out.chosen_rewards.sum()), float(b)),
        "rejected_reward": (float(out.rejected_rewards.sum()), float(b)),
        "logp_chosen": (float(pol.sum[:b].detach().sum()), float(pol.count[:b].sum())),
        "tokens": (ntok, 0.0),
    }
    return loss, stats


def mix_dpo_micro(model, pair_batch, *, cfg: MixDPOConfig, lam: float, ref: fk.SequenceLogp, norm: Norm,
                  backend: str = "auto") -> Tuple[torch.Tensor, Stats]:
    """The App. D term ``lambda * DPO`` (sigmoid, ``cfg.beta``) on a micro-batch of pairs."""
    pol = pair_logps(model, pair_batch, backend=backend)
    out = dpo_from_logps(pol, ref, kind="sigmoid", beta=cfg.beta)
    b = pol.sum.shape[0] // 2
    loss = lam * out.losses.sum() * norm.sum_scale()
    return loss, {"mix_dpo_loss": (float(out.losses.detach().sum()), float(b)),
                  "mix_dpo_accuracy": (float((out.chosen_rewards > out.rejected_rewards).float().sum()), float(b))}


def adapt_lambda(lam: float, accuracy: float, cfg: MixDPOConfig) -> float:
    """PPO-style adaptive coefficient: halve when the DPO accuracy beats the target, else double."""
    lam = lam / 2 if accuracy > cfg.target_accuracy else lam * 2
    return float(min(max(lam, cfg.lambda_min), cfg.lambda_max))
