"""The loss computations of one micro-batch of SFT, DPO, pretraining and their metrics.

Every function runs the model body to the last hidden states and calls a fused loss with the
LM-head weight (:func:`fdiv_kernels.hf.head_inputs`: the model's logit scale and soft-cap
included): SFT :func:`fdiv_kernels.loss_from_spec` with the config's
:class:`~fdiv_kernels.specs.FDivSpec`, DPO :class:`fdiv_kernels.nn.FusedLinearDPOLoss` with its
:class:`~fdiv_kernels.specs.DPOSpec`, pretraining :func:`fdiv_kernels.token_stats`. The
``[B, T, V]`` logits are never formed.

Batches come from :func:`fdiv_kernels.train.data.collate` (unshifted ``labels``); position ``t``
of the hidden states predicts ``labels[t + 1]``. Pair batches (:func:`~fdiv_kernels.train.data.collate_pairs`)
hold ``2B`` rows, the chosen answers then the rejected ones.

Normalisation. A micro-batch returns the loss to back-propagate already scaled so that summing
over the micro-batches of a step and averaging over processes (DDP) gives the loss of the whole
global batch: ``sum_over_tokens(loss) / global_tokens * world_size`` (rows/pairs for sequence
level and DPO; :class:`~fdiv_kernels.train.trainer.Norm`); SFT's ``values="free"`` term over the
global rows and its ``z_loss`` over the global tokens. The log-mean-exp of ``kl`` and
``squared_hellinger`` is returned as a :class:`~fdiv_kernels.train.accumulate.LogMeanExpLoss`
(``log sum psi`` of the micro-batch), which the loop combines exactly over the global batch.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Optional, Tuple

import torch

import fdiv_kernels as fk

from ..api import DPOOutput, LossOutput, loss_from_spec
from ..hf import HeadInputs, dpo_loss_module, head_inputs
from ..specs import DPOSpec, FDivSpec
from .accumulate import LogMeanExpLoss, MicroLoss
from .config import DPOConfig, MixDPOConfig, SFTConfig
from ..collate import IGNORE_INDEX
from .trainer import Norm, Stats


def shifted(batch: Dict[str, torch.Tensor]) -> torch.Tensor:
    """Labels aligned with the hidden states: ``labels[:, 1:]`` ``[B, T-1]``."""
    return batch["labels"][:, 1:]


def _inputs(model, batch, backend: str) -> HeadInputs:
    """Hidden states ``[B, T-1, H]`` (aligned with :func:`shifted`), the head and its spec."""
    x = head_inputs(model, batch["input_ids"], batch["attention_mask"], backend=backend)
    return x._replace(hidden=x.hidden[:, :-1])


def token_logp(model, batch, *, backend: str = "auto") -> fk.TokenStats:
    """Per-token ``(logp, lse)`` ``[B, T-1]`` of the shifted labels (0 where ignored)."""
    x = _inputs(model, batch, backend)
    return fk.token_stats(x.hidden, x.weight, shifted(batch), bias=x.bias, ignore_index=IGNORE_INDEX,
                          softcap=x.head.softcap, temperature=x.head.temperature, backend=x.head.backend)


@torch.no_grad()
def reference_token_logp(ref_model, batch, *, backend: str = "auto") -> torch.Tensor:
    """Reference log-probs ``[B, T-1]`` under ``no_grad`` (fused primitive)."""
    return token_logp(ref_model, batch, backend=backend).logp.detach()


def count_tokens(batch) -> int:
    return int((shifted(batch) != IGNORE_INDEX).sum())


def sft_decomposable(cfg: SFTConfig) -> bool:
    """True when the SFT loss is a plain sum over tokens/rows (no log-mean-exp, ``values="free"``
    or ``z_loss`` term: one fused single-pass call gives every micro-batch's share)."""
    spec = cfg.loss_spec()
    return spec.divergence.aggregate == "mean" and spec.values != "free" and spec.z_loss == 0


def sft_units(batch, cfg: SFTConfig) -> int:
    """Units the SFT loss averages over: supervised tokens (token level) or non-empty rows."""
    return int(sft_counts(batch)["tokens" if cfg.level == "token" else "rows"])


def sft_counts(batch) -> Dict[str, float]:
    """``{"tokens": supervised tokens, "rows": rows with one}``: what the SFT terms divide by."""
    lab = shifted(batch) != IGNORE_INDEX
    return {"tokens": float(lab.sum()), "rows": float(lab.any(dim=1).sum())}


def _with_counts(norm: Norm, counts: Dict[str, float]) -> Norm:
    """``norm`` with the counts a micro-batch's terms divide by: a norm built by hand for one
    micro-batch on one process (holding only the phase's own units) gets this micro-batch's."""
    if set(counts) <= set(norm.counts):
        return norm
    if norm.num_micro * norm.world_size != 1:
        raise ValueError(f"Norm.counts needs the step's global {sorted(counts)} over several micro-batches")
    return Norm(norm.global_count, 1, 1, {**counts, **norm.counts})


def _sft_terms(spec: FDivSpec, out: LossOutput):
    """``(main, v_sum, z_sum, log_sum)`` of a ``reduction="sum"`` SFT output: the divergence's
    sum over units (mean aggregates), ``sum_rows V(s0)`` (``values="free"``), ``sum_tokens
    lse^2`` (``z_loss``) and (log-mean-exp divergences) ``log sum psi`` (0 when nothing is
    supervised); ``None`` where absent. The summed loss is ``main or log_sum`` plus the linear terms."""
    mask, zero = out.mask, out.logp.new_zeros(())
    v_sum = torch.where(mask.any(dim=1), out.value_s0, zero).sum() if spec.values == "free" else None
    z_sum = torch.where(mask, out.lse * out.lse, zero).sum() if spec.z_loss > 0 else None
    linear = sum(t for t in (v_sum, None if z_sum is None else spec.z_loss * z_sum) if t is not None)
    if spec.divergence.aggregate == "mean":
        return out.loss - linear, v_sum, z_sum, None
    return None, v_sum, z_sum, torch.where(mask.any(), out.log_sum_psi, zero)


def sft_micro(model, batch, *, cfg: SFTConfig, ref_logp: Optional[torch.Tensor], norm: Norm,
              backend: str = "auto") -> Tuple[MicroLoss, Stats]:
    """SFT loss of one micro-batch (``cfg.loss_spec()``, fused) and its statistics.

    Every term is a share of the global batch's loss: the divergence's sum over units, the
    ``values="free"`` term's sum over rows and the ``z_loss`` term's sum over tokens divided by
    the step's global counts (``norm.counts``); for ``kl`` and ``squared_hellinger`` a
    :class:`~fdiv_kernels.train.accumulate.LogMeanExpLoss` whose ``log sum psi`` the loop
    combines over the global batch (exact accumulation, ``docs/math.md``).

    Stats: ``loss`` (the linear terms; the loop adds the global log-mean-exp); ``nll`` (mean
    -logp per supervised token); ``value_s0`` (mean lse at each row's first response position,
    the paper's V(s0)); ``logratio_ref`` (mean logp - ref_logp per token, a sample estimate of
    the per-token KL(pi || ref) on the data's answers).
    """
    x = _inputs(model, batch, backend)
    norm = _with_counts(norm, sft_counts(batch))
    spec = cfg.loss_spec(reduction="sum")
    out = loss_from_spec(spec, x.hidden, x.weight, shifted(batch), ref_logp=ref_logp, bias=x.bias, head=x.head,
                         ignore_index=IGNORE_INDEX)
    unit = "tokens" if cfg.level == "token" else "rows"
    main, v_sum, z_sum, log_sum = _sft_terms(spec, out)
    linear = out.logp.new_zeros(())
    if main is not None:
        linear = linear + main * norm.sum_scale(unit)
    if v_sum is not None:
        linear = linear + v_sum * norm.sum_scale("rows")
    if z_sum is not None:
        linear = linear + spec.z_loss * z_sum * norm.sum_scale("tokens")
    mask = out.mask
    ntok = float(mask.sum())
    rows = mask.any(dim=1)
    loss: MicroLoss = linear
    if log_sum is not None:
        loss = LogMeanExpLoss(log_sum, ntok if unit == "tokens" else float(rows.sum()), norm.count(unit), linear)
    stats: Stats = {
        "loss": (float(linear.detach()) / norm.world_size, 0.0),
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


# ---------------------------------------------------------------------------------------------
# DPO family on pair batches
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def reference_pair_logps(ref_model, batch, *, spec: DPOSpec, backend: str = "auto") -> torch.Tensor:
    """``[2B]`` reference sequence log-probs of a pair batch in ``spec``'s normalisation (sums, or
    means for length-normalised kinds), under ``no_grad``."""
    x = _inputs(ref_model, batch, backend)
    loss_fn = dpo_loss_module(spec, x.head, ignore_index=IGNORE_INDEX)
    return loss_fn.sequence_logps(x.hidden, x.weight, shifted(batch), bias=x.bias).detach()


def pair_loss(model, batch, *, spec: DPOSpec, ref: Optional[torch.Tensor],
              backend: str = "auto") -> Tuple[DPOOutput, HeadInputs]:
    """:class:`fdiv_kernels.nn.FusedLinearDPOLoss` of a pair batch (``ref``: ``[2B]`` from
    :func:`reference_pair_logps` with the same spec; ``None`` for simpo), and its inputs."""
    x = _inputs(model, batch, backend)
    out = dpo_loss_module(spec, x.head, ignore_index=IGNORE_INDEX)(x.hidden, x.weight, shifted(batch), bias=x.bias,
                                                                   ref_logp=ref, return_output=True)
    return out, x


def policy_logps(out: DPOOutput, ref: Optional[torch.Tensor], spec: DPOSpec) -> torch.Tensor:
    """``[2B]`` policy sequence log-probs the loss used (spec's normalisation), detached, from
    the rewards ``beta * (s - s_ref)`` (``beta * s`` without a reference) of ``out``."""
    s = torch.cat([out.chosen_rewards, out.rejected_rewards]).double() / spec.beta
    return s + ref.double() if (spec.needs_reference and ref is not None) else s


def _pair_stats(out: DPOOutput, b: int) -> Stats:
    return {"accuracy": (float((out.chosen_rewards > out.rejected_rewards).float().sum()), float(b)),
            "margin": (float((out.chosen_rewards - out.rejected_rewards).sum()), float(b))}


def dpo_micro(model, batch, *, cfg: DPOConfig, ref: Optional[torch.Tensor], norm: Norm,
              backend: str = "auto") -> Tuple[torch.Tensor, Stats]:
    """DPO-family loss of a micro-batch of pairs (sum over pairs / global pairs).

    With ``cfg.sft_weight > 0`` the spec's ``sft`` term adds ``sft_weight * NLL`` of the chosen
    answers in the same fused pass, over the step's global count of chosen tokens
    (``norm.counts["chosen_tokens"]``, :func:`dpo_counts`, given to the spec as ``nll_tokens``), so
    one process, gradient accumulation and data-parallel ranks optimise the same objective. Stats:
    ``loss``, ``dpo_loss`` (the preference terms, without the NLL), ``accuracy``, ``margin``,
    ``chosen_reward``, ``rejected_reward``, ``logp_chosen`` (mean per-token log-prob of the chosen
    answers), ``tokens``.
    """
    spec = cfg.spec
    labels = shifted(batch)
    b = labels.shape[0] // 2
    if cfg.sft_weight > 0 and b:
        # the call's loss is a mean over its b pairs, scaled by b / P below: N = C * b / P makes its
        # sft term sum_chosen(-logp) / C over the step's C chosen tokens
        chosen = _with_counts(norm, dpo_counts(batch)).count("chosen_tokens")
        spec = dataclasses.replace(spec, nll_tokens=max(chosen, 1.0) * b / max(norm.count(), 1.0))
    out, _ = pair_loss(model, batch, spec=spec, ref=ref, backend=backend)
    counts = (labels != IGNORE_INDEX).sum(dim=1)
    loss = out.loss * b * norm.sum_scale()
    pair_part = out.losses.detach() if out.nll is None else out.losses.detach() - cfg.sft_weight * out.nll
    s = policy_logps(out, ref, spec)[:b]
    chosen_sum = float((s * counts[:b] if spec.length_normalize else s).sum())
    stats: Stats = {
        "loss": (float(loss.detach()) / norm.world_size, 0.0),
        "dpo_loss": (float(pair_part.sum()), float(b)),
        **_pair_stats(out, b),
        "chosen_reward": (float(out.chosen_rewards.sum()), float(b)),
        "rejected_reward": (float(out.rejected_rewards.sum()), float(b)),
        "logp_chosen": (chosen_sum, float(counts[:b].sum())),
        "tokens": (float(counts.sum()), 0.0),
    }
    return loss, stats


def dpo_counts(batch) -> Dict[str, float]:
    """``{"chosen_tokens": supervised tokens of the chosen rows}`` of a pair batch: what the NLL term
    of :func:`dpo_micro` divides by (summed over the step into ``Norm.counts``)."""
    labels = shifted(batch)
    return {"chosen_tokens": float((labels[: labels.shape[0] // 2] != IGNORE_INDEX).sum())}


def mix_dpo_micro(model, pair_batch, *, cfg: MixDPOConfig, lam: float, ref: torch.Tensor, norm: Norm,
                  backend: str = "auto") -> Tuple[torch.Tensor, Stats]:
    """The App. D term ``lambda * DPO`` (``cfg.spec``: sigmoid, ``cfg.beta``) on a micro-batch of pairs."""
    out, _ = pair_loss(model, pair_batch, spec=cfg.spec, ref=ref, backend=backend)
    b = pair_batch["input_ids"].shape[0] // 2
    loss = lam * out.loss * b * norm.sum_scale()
    st = _pair_stats(out, b)
    return loss, {"mix_dpo_loss": (float(out.losses.detach().sum()), float(b)), "mix_dpo_accuracy": st["accuracy"]}


def adapt_lambda(lam: float, accuracy: float, cfg: MixDPOConfig) -> float:
    """PPO-style adaptive coefficient: halve when the DPO accuracy beats the target, else double."""
    lam = lam / 2 if accuracy > cfg.target_accuracy else lam * 2
    return float(min(max(lam, cfg.lambda_min), cfg.lambda_max))
