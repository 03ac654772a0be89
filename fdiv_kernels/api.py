"""The public entry points: ``fk.loss``, ``fk.primal_loss``, ``fk.dpo_loss``, ``fk.distill_loss``,
``fk.token_stats``, ``fk.token_stats_from_logits``, ``fk.sequence_logp``, ``fk.loss_from_spec`` and
``fk.distill_from_spec``.

Each one validates its inputs once (:mod:`fdiv_kernels.checks`: after that line everything below
trusts them), builds the spec of its options (:mod:`fdiv_kernels.specs`) and calls the autograd
layer (:mod:`fdiv_kernels.autograd.evaluate`) with its eager primitives, or with their custom ops
under ``torch.compile`` (:mod:`fdiv_kernels.compiled`): this module is the only place that chooses.

Conventions of :func:`loss` (derivations in ``docs/math.md``):

* Rows are the leading dims of ``labels`` except the last; a 1-D ``labels`` is one row.
* ``logratio[t] = logp[t] - ref_logp[t]`` on supervised tokens (``ref_logp = 0`` when absent).
* Values come from the log-sum-exp of the logits: ``V(s_t) = lse[t]`` at the position that
  predicts token ``t``. ``s0`` is a row's first supervised position, ``s_T`` its last one.
* Implicit reward ``u``:
    - ``level="token"``: ``u[t] = beta * logratio[t] + dV[t]``, ``dV[t] = V(s_t) - V(s_next(t))``
      (``s_next`` = the row's next supervised position; 0 for the last one), so that the
      per-token rewards of a row sum to the sequence-level reward;
    - ``level="sequence"``: ``u = beta * sum_t logratio[t] + V(s0) - V(s_T)`` (``sum`` becomes a
      mean with ``length_normalize=True``).
* ``values`` fixes the gauge of V (the free direction of Theorem 2): ``"drop"`` (default) sets
  dV = 0; ``"detach"`` uses dV without gradient; ``"free"`` uses dV with gradient and adds the
  ``+V(s0)`` term of the paper's objective, which has a free direction: pair it with
  ``z_loss > 0``.
* Loss: ``-phi(u)`` reduced by mean/sum over supervised tokens (token level) or over rows with
  at least one supervised token (sequence level), or the ``logmeanexp`` form for KL/squared
  Hellinger; plus ``z_loss * mean(lse**2)`` over supervised tokens.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal, NamedTuple, Optional, Sequence, Tuple, Union, overload

import torch
import torch.distributed as dist

from . import checks, compiled
from .autograd import vocab_parallel
from .autograd.class_options import class_vector
from .autograd.predicted import target_logits, token_accuracy
from .autograd.evaluate import EAGER, Primitives, evaluate, evaluate_logits
from .autograd.token_stats import LogpLse, TokenStats, TokenStatsParams, head_logits, stats_result
from .autograd.token_stats import token_stats_from_logits as _stats_from_logits
from .formulas.divergences import Divergence
from .formulas.preference import kto_losses, nll_weight, pair_losses
from .formulas.primal import PrimalLoss
from .specs import DistillSpec, DPOSpec, FDivSpec, HeadSpec, KTOSpec, LossSpec, PrimalSpec, Rows, VocabShard, is_loss_spec

__all__ = ["DPOOutput", "DistillOutput", "KTOOutput", "LossOutput", "SequenceLogp", "distill_from_spec", "distill_loss",
           "dpo_loss", "kto_loss", "loss", "loss_from_spec", "primal_loss", "sequence_logp", "shift_for_causal_lm",
           "token_stats", "token_stats_from_logits"]


def primitives() -> Primitives:
    """The autograd layer's primitives: the custom ops while ``torch.compile`` traces, else eager."""
    return compiled.OPS if compiled.compiling() else EAGER


@dataclass
class LossOutput:
    """What :func:`loss` returns.

    Attributes:
        loss: the scalar loss (a tensor of per-token / per-row losses for ``reduction="none"``).
        logp, lse: per-token ``[..., T]`` log-prob of the label and log-sum-exp (0 at ignored positions).
        reward: implicit reward ``u``: ``[..., T]`` at token level, ``[...]`` at sequence level.
        value_s0: ``[...]`` lse at each row's first supervised position (0 for all-ignored rows).
        mask: ``[..., T]`` bool, supervised positions.
        num_tokens: number of supervised tokens (a 0-dim tensor).
        divergence: the registry entry used (a :class:`~fdiv_kernels.formulas.primal.PrimalLoss` for
            :func:`primal_loss`).
        entropy: ``[..., T]`` per-token entropy of the policy when ``return_entropy=True``.
        log_sum_psi: for the log-mean-exp divergences (``kl``, ``squared_hellinger``), the
            log-sum-exp part ``log sum_i psi_i`` of the loss (0-d, differentiable; ``-inf`` when
            nothing is supervised); ``None`` for the others. With ``reduction="sum"`` the loss is
            ``log_sum_psi`` plus the linear terms (``values="free"``, ``z_loss``): what
            :class:`fdiv_kernels.LogSumExpAccumulator` accumulates over micro-batches.
        token_accuracy: with ``return_token_accuracy=True``, the fraction (0-d float32) of
            supervised tokens whose largest logit is the label's (0 when none); else None.
        predicted_tokens: with ``return_token_accuracy=True``, ``[..., T]`` int64, each supervised
            token's argmax of the logits, ``-1`` where ignored (Liger's ``predicted_tokens``); else None.
        target_logit: with ``return_target_logit=True``, ``[..., T]`` each supervised token's logit
            of its label ``z_y`` (after soft-cap and temperature; 0 where ignored), exact (an indexed
            dot ``h . W[y] + b[y]``, not ``logp + lse``) and differentiable; else None.

    ``logp``, ``lse``, ``entropy``, ``reward`` and ``value_s0`` are differentiable: using them in
    another loss adds their gradients (computed by the backend's recompute kernels).
    """

    loss: torch.Tensor
    logp: torch.Tensor
    lse: torch.Tensor
    reward: torch.Tensor
    value_s0: torch.Tensor
    mask: torch.Tensor
    num_tokens: torch.Tensor
    divergence: Union[Divergence, PrimalLoss]
    entropy: Optional[torch.Tensor] = None
    log_sum_psi: Optional[torch.Tensor] = None
    token_accuracy: Optional[torch.Tensor] = None
    predicted_tokens: Optional[torch.Tensor] = None
    target_logit: Optional[torch.Tensor] = None


class SequenceLogp(NamedTuple):
    """Per-row sums and means of the label log-probs (what DPO-family losses consume)."""

    sum: torch.Tensor
    mean: torch.Tensor
    count: torch.Tensor


@dataclass
class DPOOutput:
    """``loss``: mean over pairs. ``losses``: ``[B]`` (the weighted sum of the loss types; the sorted
    types aot/aot_unpaired per rank, as TRL; the sft term's share, its weight times the batch's mean
    NLL, in every pair). ``chosen_rewards``/``rejected_rewards``: ``beta * (pi - ref)`` (``beta * pi``
    without a reference), detached. ``accuracy``: fraction of pairs with chosen reward > rejected
    reward. ``margin``: mean reward margin. ``nll``: the sft term's mean NLL of the chosen tokens
    (detached, before its weight; None without the term)."""

    loss: torch.Tensor
    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    accuracy: torch.Tensor
    margin: torch.Tensor
    nll: Optional[torch.Tensor] = None


@dataclass
class KTOOutput:
    """``loss``: mean over the ``B`` rows. ``losses``: ``[B]`` (the sft term's share in every row).
    ``chosen_rewards`` ``[D]`` / ``rejected_rewards`` ``[U]``: ``beta * (pi - ref)`` of the
    desirable / undesirable rows (TRL's metrics), detached. ``kl``: the KL estimate used (0-d)."""

    loss: torch.Tensor
    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    kl: torch.Tensor


# ---------------------------------------------------------------------------------------------
# The causal-LM shift and the input checks shared by the entry points
# ---------------------------------------------------------------------------------------------

def shift_for_causal_lm(x: torch.Tensor, labels: torch.Tensor, ref_logp: Optional[torch.Tensor] = None,
                        shift: int = 1) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Causal-LM shift by ``shift = k`` positions: ``x[..., :T-k, :]`` predicts ``labels[..., k:]``
    (``k = 1``: Hugging Face's; any ``k``: cut-cross-entropy's ``shift``).

    ``x`` is ``[..., T, D]`` (hidden states or logits), ``labels`` ``[..., T]``; a per-token
    ``ref_logp [..., T]`` (aligned with the unshifted labels) is shifted like the labels; one of
    shape ``[..., T-k]`` (already shifted, e.g. ``LossOutput.logp`` of a reference computed with
    the same shift) and a per-row ``ref_logp`` are returned unchanged.
    """
    k = checks.check_shift(shift)
    if labels.dim() < 1 or labels.shape[-1] < 1:
        raise ValueError(f"the causal-LM shift needs labels with a sequence dimension, got shape {tuple(labels.shape)}")
    if tuple(x.shape[:-1]) != tuple(labels.shape):
        raise ValueError(f"labels must have shape {tuple(x.shape[:-1])} (the leading dims of the input), "
                         f"got {tuple(labels.shape)}")
    t = labels.shape[-1]
    if k > t:
        raise ValueError(f"shift={k} is longer than the sequence (T={t})")
    if ref_logp is not None and tuple(ref_logp.shape) == tuple(labels.shape):
        ref_logp = ref_logp[..., k:]
    return x[..., :t - k, :], labels[..., k:], ref_logp


def _shifted(hidden, logits, labels, ref_logp, shift: int):
    """:func:`shift_for_causal_lm` by ``shift`` applied to whichever of ``hidden``/``logits`` is given."""
    if labels is None or (hidden if logits is None else logits) is None:
        return hidden, logits, labels, ref_logp  # the input checks name what is missing
    if logits is not None:
        logits, labels, ref_logp = shift_for_causal_lm(logits, labels, ref_logp, shift)
    else:
        hidden, labels, ref_logp = shift_for_causal_lm(hidden, labels, ref_logp, shift)
    return hidden, logits, labels, ref_logp


def _one_input(hidden, weight, labels, logits, bias) -> None:
    """Either ``logits`` or ``(hidden, weight)``, with labels (what is given, not its shapes)."""
    if logits is not None:
        if hidden is not None or weight is not None:
            raise ValueError("pass either logits= or (hidden, weight), not both")
        if labels is None:
            raise ValueError("labels are required")
        if bias is not None:
            raise ValueError("bias applies to (hidden, weight) only; add it to the logits yourself")
    elif hidden is None or weight is None or labels is None:
        raise ValueError("the loss needs (hidden, weight, labels) or (logits=..., labels=...)")


def _check_inputs(hidden, weight, labels, logits, bias, head: HeadSpec) -> None:
    """The shapes, dtypes and devices of what is given (:func:`_one_input` ran first)."""
    if logits is not None:
        checks.check_logits(logits, labels)
    else:
        checks.check_head(hidden, weight, labels, bias)


def _sharded_head(hidden, weight, bias, labels, logits, vocab_group, head: HeadSpec):
    """``(weight, bias, head)`` of a call: for a vocabulary-parallel head (``vocab_group=``, a
    ``DTensor`` weight placed ``Shard(0)``, or a ``head`` whose ``vocab`` is set), this rank's local
    shards and the head with its :class:`~fdiv_kernels.specs.VocabShard`, resolved by one
    all-gather of every rank's :data:`~fdiv_kernels.checks.SHARD_FACTS` and checked there (every
    rank raises the same error); a group of one is the whole head. Else the arguments as given."""
    if vocab_group is None and head.vocab is not None:
        vocab_group = head.vocab.group
    checks.check_vocab_layout(hidden, weight, bias, logits, vocab_group, compiled.compiling())
    if checks.is_dtensor(weight):
        mesh = weight.device_mesh
        group, index, global_rows = mesh.get_group(), mesh.get_local_rank(), weight.shape[0]
        weight, bias = weight.to_local(), None if bias is None else bias.to_local()
    elif vocab_group is not None:
        group, index, global_rows = vocab_group, dist.get_rank(vocab_group), -1
    else:
        return weight, bias, head
    if dist.get_world_size(group) == 1:
        return weight, bias, dataclasses.replace(head, vocab=None)
    facts = checks.shard_facts(index, hidden, weight, bias, labels, global_rows)
    sizes = checks.check_vocab_shards(vocab_parallel.all_gather_rows(group, facts))
    return weight, bias, dataclasses.replace(head, vocab=VocabShard(group, index, sizes))


def _vocab_size(weight: torch.Tensor, head: HeadSpec) -> int:
    """Rows of the whole head: the labels' range."""
    return weight.shape[0] if head.vocab is None else head.vocab.vocab_size


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``[rows, T]`` view of ``t [..., T]`` (a 1-D ``t`` is one row; ``T`` may be 0)."""
    return t.reshape(1, -1) if t.dim() == 1 else t.reshape(math.prod(t.shape[:-1]), t.shape[-1])


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _reference(ref_logp, labels, spec: LossSpec, m2, dtype) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Per-token reference log-probs ``[R, T]`` (masked; a 0-d zero when absent) and/or per-row
    ``[R]``, in the shapes the spec takes (:attr:`LossSpec.references`)."""
    zero = torch.zeros((), dtype=dtype, device=labels.device)
    if ref_logp is None:
        return zero, None
    if not spec.references:
        raise ValueError(f"{type(spec).__name__} takes no reference (ref_logp): the primal losses read log p_y alone")
    if checks.check_reference(ref_logp, labels, spec.references) == "token":
        return torch.where(m2, _rows(ref_logp).to(dtype), zero), None
    return zero, ref_logp.reshape(-1).to(dtype)


# ---------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------

def loss(hidden: Optional[torch.Tensor] = None, weight: Optional[torch.Tensor] = None,
         labels: Optional[torch.Tensor] = None, *, logits: Optional[torch.Tensor] = None,
         divergence: str = "sft", ref_logp: Optional[torch.Tensor] = None, beta: float = 1.0,
         level: str = "token", ignore_index: int = -100, reduction: str = "mean",
         backend: str = "auto", bias: Optional[torch.Tensor] = None, length_normalize: bool = False,
         values: str = "drop", z_loss: float = 0.0, softcap: Optional[float] = None,
         temperature: float = 1.0, return_entropy: bool = False, shift: Union[bool, int] = False,
         vocab_group=None, label_smoothing: float = 0.0, class_weight: Optional[torch.Tensor] = None,
         return_token_accuracy: bool = False, return_target_logit: bool = False) -> LossOutput:
    """f-divergence SFT loss, fused with the LM head (or from ``logits=``).

    Args:
        hidden: ``[..., T, H]`` hidden states before the LM head; with ``weight [V, H]``.
        labels: ``[..., T]`` target ids, ``ignore_index`` where unsupervised: already shifted
            (``labels[t]`` is predicted from ``hidden[t]``), or unshifted with ``shift=True``.
        logits: ``[..., T, V]`` instead of ``hidden``/``weight``.
        divergence: a name in :data:`fdiv_kernels.DIVERGENCES` (``"sft"`` = ``"tv"`` = NLL): the
            registry entries with a variational objective.
        ref_logp: reference model log-probs, ``[..., T]`` per token, or ``[...]`` per row at
            sequence level. ``None`` means ``pi_ref = 1`` (no anchor). Gradients reach it when it
            requires grad (a trained reference).
        beta: the KL-anchor weight in ``u = beta * log(pi / pi_ref) + ...``.
        level: ``"token"`` or ``"sequence"``.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        length_normalize: sequence level only: use the mean log-ratio of a row instead of the sum.
        values: ``"drop"``, ``"detach"`` or ``"free"``: how V = lse enters the reward.
        z_loss: weight of ``mean(lse**2)`` over supervised tokens (fixes the gauge of V).
        bias, softcap, temperature, backend, ignore_index: as in :func:`token_stats`.
        return_entropy: also compute the per-token entropy (``out.entropy``), in the same pass.
        shift: the causal-LM shift inside (:func:`shift_for_causal_lm`): ``True`` (or 1, Hugging
            Face's) takes ``labels = input_ids [..., T]`` as they are, ``labels[..., 1:]`` predicted
            from ``hidden[..., :-1, :]`` (``logits[..., :-1, :]``); an int ``k`` shifts by ``k``
            positions (cut-cross-entropy's ``shift``). A per-token ``ref_logp [..., T]`` is shifted
            the same way (``[..., T-k]`` and per-row ones pass unchanged). The outputs then have
            ``T - k`` positions.
        vocab_group: a ``torch.distributed`` process group across which the head is split along
            the vocabulary (tensor parallelism): ``weight [V_r, H]`` (and ``bias [V_r]``) is this
            rank's shard, the rows that follow the previous rank's; ``labels`` are global ids and
            ``hidden``/``labels`` the same on every rank. A ``DTensor`` weight placed ``Shard(0)``
            on a one-dimensional mesh (``ColwiseParallel``) is detected without it. Every rank gets
            the whole head's loss and statistics, its shard's ``grad_weight`` and the full
            ``grad_hidden`` (summed over the group); the ``[N, V]`` logits are never gathered
            (``docs/performance.md``, "Vocabulary parallelism").
        label_smoothing: ``eps`` in ``[0, 1]``: each token's loss becomes ``(1 - eps) L_t + eps
            U_t``, ``U_t = -(1/V) sum_v c_v log p_v`` the cross-entropy to the (class-weighted)
            uniform distribution (PyTorch's ``label_smoothing``, Hugging Face's
            ``label_smoothing_factor``, Liger's ``label_smoothing``). Not with ``softcap``.
        class_weight: ``[V]`` finite weights ``c >= 0`` (``F.cross_entropy(weight=)``, Liger's
            ``ce_weight``): token ``t``'s loss is weighted by ``c[y_t]`` and a mean divides by
            ``sum_t c[y_t]`` (0 when that is 0). Both options: token level, ``values="drop"``, a
            divergence averaged per token (not ``kl``/``squared_hellinger``); not with a
            vocabulary-parallel head (``docs/math.md`` section 3).
        return_token_accuracy: also ``out.token_accuracy`` and ``out.predicted_tokens`` (Liger's
            ``return_token_accuracy`` / ``return_predicted_tokens``, TRL's ``mean_token_accuracy``):
            read off the fused pass's kept logits (no extra GEMM) when gradients are needed, on
            every backend; else (no gradients, the two-pass specs) one more logits pass; not under
            ``torch.compile`` or with ``vocab_group=``.
        return_target_logit: also ``out.target_logit``, each token's logit of its label (cut
            cross-entropy's indexed dot): ``n x H`` multiply-adds, no GEMM; not with ``vocab_group=``.

    Returns:
        :class:`LossOutput`. With ``divergence="sft"``, ``beta=1`` and no reference, ``loss`` equals
        ``F.cross_entropy(logits, labels, ignore_index=ignore_index, weight=class_weight,
        label_smoothing=label_smoothing)``.

    When gradients are needed, the loss and its gradients come from one pass over the logits
    (3 GEMMs, :mod:`fdiv_kernels.autograd.fused`); under ``torch.no_grad`` only the logits GEMM runs.
    """
    spec = FDivSpec(divergence, beta=beta, level=level, values=values, z_loss=z_loss,
                    length_normalize=length_normalize, reduction=reduction, label_smoothing=label_smoothing)
    if shift:
        hidden, logits, labels, ref_logp = _shifted(hidden, logits, labels, ref_logp, shift)
    return loss_from_spec(spec, hidden, weight, labels, logits=logits, ref_logp=ref_logp, bias=bias,
                          head=HeadSpec(softcap, temperature, backend), ignore_index=ignore_index,
                          return_entropy=return_entropy, vocab_group=vocab_group, class_weight=class_weight,
                          return_token_accuracy=return_token_accuracy, return_target_logit=return_target_logit)


def primal_loss(hidden: Optional[torch.Tensor] = None, weight: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None, *, logits: Optional[torch.Tensor] = None,
                divergence: str = "kl", alpha: float = 1.5, ignore_index: int = -100, reduction: str = "mean",
                z_loss: float = 0.0, backend: str = "auto", bias: Optional[torch.Tensor] = None,
                softcap: Optional[float] = None, temperature: float = 1.0, return_entropy: bool = False,
                shift: Union[bool, int] = False, vocab_group=None) -> LossOutput:
    """Primal per-token f-divergence loss ``D_f(onehot(y) || p)`` (:mod:`fdiv_kernels.formulas.primal`),
    fused with the LM head (or from ``logits=``); a function of ``log p_y`` alone, no reference.

    Args:
        divergence: a registry name with a primal form (``kl`` = NLL, ``tv``, ``pearson``,
            ``squared_hellinger``, ``js``, ``alpha``; :func:`fdiv_kernels.divergence_names` with
            ``"primal"``). ``reverse_kl`` and ``neyman`` have ``f(0) = inf``: no primal form.
        alpha: the coefficient ``a`` of ``divergence="alpha"`` (Amari; > 0).
        reduction: ``"mean"`` (over supervised tokens), ``"sum"`` or ``"none"``.
        z_loss: weight of ``mean(lse**2)`` over supervised tokens (with ``reduction`` mean or sum).
        hidden, weight, labels, logits, bias, softcap, temperature, backend, ignore_index,
        return_entropy, shift, vocab_group: as in :func:`loss`.

    Returns:
        :class:`LossOutput` (``reward`` holds ``logp``; ``divergence`` the primal form).
        ``divergence="kl"`` equals ``F.cross_entropy``.
    """
    spec = PrimalSpec(divergence, alpha=alpha, z_loss=z_loss, reduction=reduction)
    if shift:
        hidden, logits, labels, _ = _shifted(hidden, logits, labels, None, shift)
    return loss_from_spec(spec, hidden, weight, labels, logits=logits, bias=bias,
                          head=HeadSpec(softcap, temperature, backend), ignore_index=ignore_index,
                          return_entropy=return_entropy, vocab_group=vocab_group)


def loss_from_spec(spec: LossSpec, hidden: Optional[torch.Tensor] = None, weight: Optional[torch.Tensor] = None,
                   labels: Optional[torch.Tensor] = None, *, logits: Optional[torch.Tensor] = None,
                   ref_logp: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
                   head: HeadSpec = HeadSpec(), ignore_index: int = -100,
                   return_entropy: bool = False, vocab_group=None,
                   class_weight: Optional[torch.Tensor] = None, return_token_accuracy: bool = False,
                   return_target_logit: bool = False) -> LossOutput:
    """:func:`loss` for an already built spec (:class:`~fdiv_kernels.specs.FDivSpec`,
    :class:`~fdiv_kernels.specs.PrimalSpec`, :class:`~fdiv_kernels.specs.DPOSpec` on ``2B`` rows
    with per-row references, or any :class:`~fdiv_kernels.specs.LossSpec`) and head
    (:class:`~fdiv_kernels.specs.HeadSpec`): what the ``fk.nn`` modules, the integrations and the
    trainer call. Arguments as in :func:`loss` (``labels`` already shifted); a vocabulary-parallel
    head is given by ``vocab_group=``, a ``DTensor`` weight or ``head.vocab``."""
    if not is_loss_spec(spec):
        raise TypeError(f"spec must implement fdiv_kernels.specs.LossSpec (FDivSpec, PrimalSpec, DPOSpec), "
                        f"got {type(spec).__name__}")
    _one_input(hidden, weight, labels, logits, bias)
    weight, bias, head = _sharded_head(hidden, weight, bias, labels, logits, vocab_group, head)
    _check_inputs(hidden, weight, labels, logits, bias, head)
    checks.check_rows(labels)
    prims = primitives()
    x = logits if logits is not None else hidden
    vocab_size = x.shape[-1] if logits is not None else _vocab_size(weight, head)
    labels = prims.check_labels(labels, vocab_size, ignore_index)
    checks.check_class_options(spec, class_weight, vocab_size, head, labels.device)
    c = class_vector(spec, class_weight, vocab_size, labels, _compute_dtype(x))
    if c is not None:
        c = prims.check_class_data(c, None if bias is None else bias.detach(), checks.class_smoothing(spec))
    if return_token_accuracy:
        checks.check_token_accuracy(head, compiled.compiling())
    if return_target_logit and head.vocab is not None:
        raise ValueError("return_target_logit is not supported with a vocabulary-parallel head (vocab_group= or a "
                         "sharded DTensor weight) yet")
    mask = labels != ignore_index
    m2 = _rows(mask)
    ref_tok, ref_seq = _reference(ref_logp, labels, spec, m2, _compute_dtype(x))
    if logits is not None:
        ev = evaluate_logits(spec, prims, logits=logits, labels=labels, ref_tok=ref_tok, ref_seq=ref_seq,
                             ignore_index=ignore_index, return_entropy=return_entropy, class_weight=c,
                             return_predicted=bool(return_token_accuracy), head=head)
    else:
        ev = evaluate(spec, prims, hidden=hidden, weight=weight, bias=bias, labels=labels, ref_tok=ref_tok,
                      ref_seq=ref_seq, head=head, ignore_index=ignore_index, return_entropy=return_entropy,
                      class_weight=c, return_predicted=bool(return_token_accuracy))
    rows = Rows(_rows(ev.logp), _rows(ev.lse), m2, ref_tok, ref_seq)
    u, _, v_s0 = spec.rewards(rows)
    row_shape = labels.shape[:-1] if labels.dim() > 1 else ()
    reward = u.reshape(labels.shape) if u.shape == m2.shape else u.reshape(row_shape)
    out_loss = ev.loss
    if spec.reduction == "none":
        out_loss = out_loss.reshape(labels.shape) if out_loss.shape == m2.shape else out_loss.reshape(row_shape)
    return LossOutput(loss=out_loss, logp=ev.logp, lse=ev.lse, reward=reward, value_s0=v_s0.reshape(row_shape),
                      mask=mask, num_tokens=mask.sum(), divergence=spec.divergence, entropy=ev.entropy,
                      log_sum_psi=ev.log_sum_psi, predicted_tokens=ev.predicted,
                      target_logit=target_logits(hidden, weight, bias, labels, head, ignore_index, logits)
                      if return_target_logit else None,
                      token_accuracy=None if ev.predicted is None else token_accuracy(ev.predicted, labels, ignore_index))


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
             ref_chosen: Optional[torch.Tensor] = None, ref_rejected: Optional[torch.Tensor] = None, *,
             beta: float, loss_type: Union[str, Sequence[str]] = "sigmoid", label_smoothing: float = 0.0,
             gamma: float = 0.0, divergence: str = "kl", alpha: float = 1.0,
             loss_weights: Optional[Sequence[float]] = None, discopop_tau: float = 0.05,
             length_normalize: Optional[bool] = None, reference_free: bool = False,
             chosen_tokens: Optional[torch.Tensor] = None, nll_tokens: Optional[float] = None) -> DPOOutput:
    """The DPO family (DPO, IPO, hinge, robust, SimPO, EXO, NCA, BCO, SPPO, AOT, APO, DiscoPOP, ORPO,
    their weighted combinations and the NLL term) on ``[B]`` sequence log-probs.

    Args:
        policy_chosen, policy_rejected: ``[B]`` policy sequence log-probs (e.g. from
            :func:`sequence_logp`; the means for length-normalised types), with gradient.
        ref_chosen, ref_rejected: ``[B]`` reference log-probs; required by the loss types that
            need a reference (:data:`fdiv_kernels.DPO_LOSS_TYPES`) unless ``reference_free``. A NaN
            or ``+inf`` reference is not a log-probability: ``ValueError`` naming it and the pair.
        beta, loss_type, label_smoothing, gamma, divergence, alpha, loss_weights, discopop_tau,
            length_normalize, reference_free, nll_tokens: the fields of
            :class:`~fdiv_kernels.specs.DPOSpec` (validated there; the formulas and TRL's names:
            :mod:`fdiv_kernels.formulas.preference`). ``loss_type`` may list several types, summed
            with ``loss_weights`` (TRL's ``loss_type=[...]``, ``loss_weights=[...]``).
        chosen_tokens: ``[B]`` number of answer tokens of each chosen row, needed by the ``sft``
            term (the chosen answers' mean NLL per token, ``-sum_i pc_i / sum_i n_i``; with
            length-normalised inputs ``-sum_i pc_i n_i / sum_i n_i``), over ``nll_tokens`` when given.
    """
    spec = DPOSpec(loss_type=loss_type, beta=beta, label_smoothing=label_smoothing, gamma=gamma,
                   divergence=divergence, alpha=alpha, length_normalize=length_normalize, loss_weights=loss_weights,
                   discopop_tau=discopop_tau, reference_free=reference_free, nll_tokens=nll_tokens)
    for name, t in (("policy_chosen", policy_chosen), ("policy_rejected", policy_rejected)):
        checks.check_floating(name, t)
    if policy_chosen.shape != policy_rejected.shape:
        raise ValueError(f"policy_chosen {tuple(policy_chosen.shape)} and policy_rejected "
                         f"{tuple(policy_rejected.shape)} must have the same shape")
    if spec.needs_reference:
        if ref_chosen is None or ref_rejected is None:
            raise ValueError(f"loss_type={loss_type!r} needs ref_chosen and ref_rejected (or reference_free=True)")
        for name, t in (("ref_chosen", ref_chosen), ("ref_rejected", ref_rejected)):
            checks.check_floating(name, t)
            if t.shape != policy_chosen.shape:
                raise ValueError(f"{name} must have shape {tuple(policy_chosen.shape)}, got {tuple(t.shape)}")
    checks.check_same_device(policy_chosen=policy_chosen, policy_rejected=policy_rejected,
                             ref_chosen=ref_chosen, ref_rejected=ref_rejected, chosen_tokens=chosen_tokens)
    cdt = _compute_dtype(policy_chosen)
    pc, pr = policy_chosen.to(cdt), policy_rejected.to(cdt)
    rc = ref_chosen.to(cdt) if spec.needs_reference else None
    rr = ref_rejected.to(cdt) if spec.needs_reference else None
    nll = _mean_nll(pc, chosen_tokens, spec.length_normalize, spec.nll_tokens, bool(nll_weight(spec)))
    losses = primitives().check_pairs(spec, pair_losses(pc, pr, rc, rr, spec, nll=nll), pc, pr, rc, rr)
    return dpo_output(spec, losses, pc, pr, rc, rr, nll)


def _mean_nll(logps: torch.Tensor, tokens: Optional[torch.Tensor], length_normalized: bool,
              nll_tokens: Optional[float], used: bool) -> Optional[torch.Tensor]:
    """The sft term's mean NLL per token of rows of sequence log-probs ``logps`` ``[n]`` with
    ``tokens`` ``[n]`` answer tokens each (None when the term is not used)."""
    if not used:
        if tokens is not None:
            raise ValueError("chosen_tokens / tokens are read by the sft term only; add 'sft' to loss_type or drop them")
        return None
    if tokens is None:
        raise ValueError("loss_type 'sft' (the NLL of the chosen answers) needs their token counts: pass chosen_tokens= "
                         "(tokens= for fk.kto_loss) or use the fused module")
    if tokens.shape != logps.shape:
        raise ValueError(f"chosen_tokens / tokens must have shape {tuple(logps.shape)}, got {tuple(tokens.shape)}")
    n = tokens.to(logps.dtype)
    total = (logps * n).sum() if length_normalized else logps.sum()
    count = n.sum() if nll_tokens is None else logps.new_tensor(nll_tokens)
    return -total / torch.where(count > 0, count, torch.ones_like(count))


def dpo_output(spec: DPOSpec, losses: torch.Tensor, pc: torch.Tensor, pr: torch.Tensor, rc: Optional[torch.Tensor],
               rr: Optional[torch.Tensor], nll: Optional[torch.Tensor] = None) -> DPOOutput:
    """The :class:`DPOOutput` of checked pair ``losses`` ``[B]``, their sequence log-probs and the
    sft term's mean NLL (None without it)."""
    if spec.needs_reference and rc is not None:
        chosen_r, rejected_r = spec.beta * (pc - rc).detach(), spec.beta * (pr - rr).detach()
    else:
        chosen_r, rejected_r = spec.beta * pc.detach(), spec.beta * pr.detach()
    empty = losses.numel() == 0
    return DPOOutput(
        loss=losses.sum() if empty else losses.mean(),
        losses=losses,
        chosen_rewards=chosen_r,
        rejected_rewards=rejected_r,
        accuracy=losses.new_zeros(()) if empty else (chosen_r > rejected_r).float().mean(),
        margin=losses.new_zeros(()) if empty else (chosen_r - rejected_r).mean(),
        nll=None if nll is None else nll.detach(),
    )


def kto_loss(policy_logps: torch.Tensor, ref_logps: Optional[torch.Tensor] = None, *, desirable: torch.Tensor,
             beta: float = 0.1, kl: Union[float, torch.Tensor] = 0.0, loss_type: Union[str, Sequence[str]] = "kto",
             loss_weights: Optional[Sequence[float]] = None, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0, length_normalize: bool = False, tokens: Optional[torch.Tensor] = None,
             nll_tokens: Optional[float] = None) -> KTOOutput:
    """KTO (TRL's ``KTOTrainer`` formulas) on ``[B]`` unpaired sequence log-probs.

    Args:
        policy_logps: ``[B]`` policy sequence log-probs, with gradient; ``ref_logps``: ``[B]``
            reference ones (None: log-probs as the log-ratios, Liger's ``use_ref_model=False``).
        desirable: ``[B]`` bool, TRL's ``label`` (Liger's ``preference_labels``).
        kl: the detached batch KL estimate ``z`` of ``loss_type="kto"`` (a float or 0-d tensor; TRL:
            ``(policy - reference log-probs of mismatched completions).mean()``, gathered over
            processes, clamped at 0), in ``u = beta (pi - ref - z)``; not read by ``apo_zero_unpaired``.
        beta, loss_type, loss_weights, desirable_weight, undesirable_weight, length_normalize,
            nll_tokens: the fields of :class:`~fdiv_kernels.specs.KTOSpec`.
        tokens: ``[B]`` answer tokens per row, needed by the ``sft`` term (the desirable rows' NLL).
    """
    checks.check_floating("policy_logps", policy_logps)
    if policy_logps.dim() != 1:
        raise ValueError(f"policy_logps must have shape [B], got {tuple(policy_logps.shape)}")
    if not isinstance(desirable, torch.Tensor) or desirable.dtype != torch.bool or desirable.shape != policy_logps.shape:
        raise ValueError(f"desirable must be a bool tensor of shape {tuple(policy_logps.shape)}")
    if ref_logps is not None:
        checks.check_floating("ref_logps", ref_logps)
        if ref_logps.shape != policy_logps.shape:
            raise ValueError(f"ref_logps must have shape {tuple(policy_logps.shape)}, got {tuple(ref_logps.shape)}")
    checks.check_same_device(policy_logps=policy_logps, ref_logps=ref_logps, desirable=desirable, tokens=tokens,
                             kl=kl if isinstance(kl, torch.Tensor) else None)
    spec = KTOSpec(loss_type=loss_type, beta=beta, desirable_weight=desirable_weight,
                   undesirable_weight=undesirable_weight, loss_weights=loss_weights, length_normalize=length_normalize,
                   nll_tokens=nll_tokens, desirable=tuple(bool(d) for d in desirable.tolist()))
    cdt = _compute_dtype(policy_logps)
    s = policy_logps.to(cdt)
    z = kl_estimate(kl, s) if spec.uses_kl else s.new_zeros(())
    ref = s.new_zeros(()) if ref_logps is None else ref_logps.to(cdt)
    losses = kto_losses(s - (ref + z), desirable, spec)
    nll = _mean_nll(s[desirable], None if tokens is None else tokens[desirable], length_normalize, nll_tokens,
                    bool(nll_weight(spec)))
    if nll is not None:
        losses = losses + nll_weight(spec) * nll
    refs = () if ref_logps is None else (("ref_logps", ref),)
    checks.check_pairs(losses, refs, lambda: _explain_rows(losses, s))
    return kto_output(spec, losses, s, None if ref_logps is None else ref, desirable, z)


def kl_estimate(kl: Union[float, torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """KTO's KL estimate as a detached 0-d tensor in ``like``'s dtype and device (checked finite)."""
    if isinstance(kl, torch.Tensor):
        checks.check_scalar_tensor("kl", kl)
        return kl.detach().to(like.dtype).reshape(())
    checks.check_finite_number("kl", kl)
    return like.new_tensor(float(kl))


def _explain_rows(losses: torch.Tensor, s: torch.Tensor) -> Optional[str]:
    bad = ~torch.isfinite(losses.detach())
    if not bool(bad.any()):
        return None
    i = int(bad.nonzero()[0])
    return f"row {i}: policy_logps = {float(s[i])} gives the KTO loss {float(losses[i])} (a NaN input)"


def kto_output(spec: KTOSpec, losses: torch.Tensor, s: torch.Tensor, ref: Optional[torch.Tensor],
               desirable: torch.Tensor, kl: torch.Tensor) -> KTOOutput:
    """The :class:`KTOOutput` of checked row ``losses`` ``[B]`` and their sequence log-probs."""
    r = spec.beta * (s if ref is None else s - ref).detach()
    return KTOOutput(loss=losses.sum() if losses.numel() == 0 else losses.mean(), losses=losses,
                     chosen_rewards=r[desirable], rejected_rewards=r[~desirable], kl=kl.detach())


# ---------------------------------------------------------------------------------------------
# Distillation
# ---------------------------------------------------------------------------------------------

@dataclass
class DistillOutput:
    """What :func:`distill_loss` returns.

    Attributes:
        loss: the scalar loss (per token ``[..., T]`` for ``reduction="none"``), differentiable in
            the student's ``hidden``, ``weight`` and ``bias``.
        divergence_loss: ``[..., T]`` per-token ``kappa D_f(P_t || P_s)`` (``kappa = T^2`` with
            ``t2_scaling``, else 1), detached; 0 at ignored positions.
        hard_loss: ``[..., T]`` per-token NLL of the label under the untempered student, detached (0
            at ignored positions, and everywhere when ``hard_label_weight = 0``: not computed).
        mask: ``[..., T]`` bool, the counted positions; num_tokens: their number (0-d).
        divergence: the registry entry used.
    """

    loss: torch.Tensor
    divergence_loss: torch.Tensor
    hard_loss: torch.Tensor
    mask: torch.Tensor
    num_tokens: torch.Tensor
    divergence: Divergence


def distill_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                 teacher_hidden: Optional[torch.Tensor] = None, teacher_weight: Optional[torch.Tensor] = None,
                 teacher_bias: Optional[torch.Tensor] = None, teacher_logits: Optional[torch.Tensor] = None,
                 divergence: str = "kl", beta: float = 0.5, alpha: Optional[float] = None, temperature: float = 1.0,
                 hard_label_weight: float = 0.0, ignore_index: int = -100, reduction: str = "mean",
                 bias: Optional[torch.Tensor] = None, shift: Union[bool, int] = False, backend: str = "auto",
                 t2_scaling: bool = False) -> DistillOutput:
    """Knowledge distillation with any f-divergence, fused with both LM heads (no ``[N, V]`` logits).

    Per counted token (``labels != ignore_index``), with ``p_t = softmax(z_t / T)`` the teacher's
    and ``p_s = softmax(z_s / T)`` the student's next-token distribution::

        loss_token = kappa * D_f(P_t || P_s) + hard_label_weight * NLL(label | softmax(z_s)),
        D_f(P_t || P_s) = sum_v p_s[v] f(p_t[v] / p_s[v])

    Args:
        hidden: ``[..., T, H]`` the student's hidden states before its LM head ``weight [V, H]``
            (``bias [V]``): the only tensors that get gradients.
        labels: ``[..., T]``: ``ignore_index`` at the positions that do not count; elsewhere the
            target of the hard-label term (Liger's ``weight_hard_loss``).
        teacher_hidden, teacher_weight, teacher_bias: the teacher's hidden states ``[..., T, H_t]``
            and LM head ``[V, H_t]`` (``H_t`` may differ from ``H``; ``V`` must match), or
        teacher_logits: ``[..., T, V]`` precomputed teacher logits. Neither gets a gradient.
        divergence: a registry name with a distillation form (:data:`fdiv_kernels.DISTILL_DIVERGENCES`):
            ``kl`` (forward, KL(teacher || student)), ``reverse_kl``, ``js`` (with ``beta``),
            ``tv``, ``squared_hellinger``, ``pearson``, ``neyman``, ``alpha`` (with ``alpha``).
        beta: ``js``'s mixture weight in ``[0, 1]``: TRL's ``generalized_jsd_loss`` and Liger's
            ``LigerFusedLinearJSDLoss`` (``beta KL(p_t || m) + (1 - beta) KL(p_s || m)``,
            ``m = beta p_t + (1 - beta) p_s``; 0 = forward KL, 1 = reverse KL, as theirs).
        alpha: Amari's coefficient for ``divergence="alpha"`` (1 = forward KL, 0 = reverse KL).
        temperature: divides both models' logits (not the hard-label term's).
        hard_label_weight: weight of the hard-label NLL (0: none).
        reduction: ``"mean"`` over counted tokens, ``"sum"``, or ``"none"`` (per token).
        shift: the causal-LM shift (:func:`shift_for_causal_lm`; ``True``/1 or ``k`` positions) of
            ``hidden``, ``teacher_hidden``, ``teacher_logits`` and ``labels`` (``labels = input_ids``).
        backend: ``"auto"`` or a backend with distillation kernels (torch, cpu, triton, cuda).
        t2_scaling: multiply the divergence by ``T^2`` (Hinton et al.; off by default, as TRL and Liger).

    Returns:
        :class:`DistillOutput`.

    Values and gradients are exact to float32 resolution wherever the divergence is finite in
    float32 (masked vocabulary entries, far-apart distributions, large logits); where it is
    infinite (``kl``/``pearson`` with a teacher token the student masks, ``reverse_kl``/``neyman``
    the other way round) or beyond float32, a ``ValueError`` names the divergence, the position and
    why (``docs/math.md``, section 8).
    """
    spec = DistillSpec(divergence, beta=beta, alpha=alpha, temperature=temperature,
                       hard_label_weight=hard_label_weight, reduction=reduction, t2_scaling=t2_scaling)
    if shift:
        checks.check_labels_dtype(labels)
        t0 = labels.shape[-1]
        hidden, labels, _ = shift_for_causal_lm(hidden, labels, None, shift)
        # the teacher's first T-k positions, when it has the student's T (else the input checks name it)
        cut = lambda x: x if x is None or x.dim() < 2 or x.shape[-2] != t0 else x[..., :labels.shape[-1], :]  # noqa: E731
        teacher_hidden, teacher_logits = cut(teacher_hidden), cut(teacher_logits)
    return distill_from_spec(spec, hidden, weight, labels, teacher_hidden=teacher_hidden,
                             teacher_weight=teacher_weight, teacher_bias=teacher_bias, teacher_logits=teacher_logits,
                             bias=bias, head=HeadSpec(backend=backend), ignore_index=ignore_index)


def distill_from_spec(spec: DistillSpec, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                      teacher_hidden: Optional[torch.Tensor] = None, teacher_weight: Optional[torch.Tensor] = None,
                      teacher_bias: Optional[torch.Tensor] = None, teacher_logits: Optional[torch.Tensor] = None,
                      bias: Optional[torch.Tensor] = None, head: HeadSpec = HeadSpec(),
                      ignore_index: int = -100) -> DistillOutput:
    """:func:`distill_loss` for a built :class:`~fdiv_kernels.specs.DistillSpec` and head (its
    backend; ``labels`` already shifted): what :class:`fdiv_kernels.nn.FusedLinearDistillLoss` and
    the TRL trainer call. Validates the inputs once, then eager or the custom op."""
    if not isinstance(spec, DistillSpec):
        raise TypeError(f"spec must be a fdiv_kernels.DistillSpec, got {type(spec).__name__}")
    if head.softcap is not None or head.temperature != 1.0:
        raise ValueError("distillation takes its temperature from the spec (DistillSpec.temperature); the head's "
                         "softcap and temperature must be left unset")
    checks.check_distill_inputs(hidden, weight, labels, bias, teacher_hidden, teacher_weight, teacher_bias,
                                teacher_logits)
    checks.check_rows(labels)
    prims = primitives()
    labels = prims.check_labels(labels, weight.shape[0], ignore_index)
    loss, div, nll = prims.distill_loss(spec, head, hidden, weight, bias, labels, teacher_hidden, teacher_weight,
                                        teacher_bias, teacher_logits, ignore_index)
    mask = labels != ignore_index
    return DistillOutput(loss=loss, divergence_loss=div, hard_loss=nll, mask=mask, num_tokens=mask.sum(),
                         divergence=spec.divergence)


# ---------------------------------------------------------------------------------------------
# The fused primitive and sequence log-probs
# ---------------------------------------------------------------------------------------------

@overload
def token_stats(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                bias: Optional[torch.Tensor] = ..., ignore_index: int = ..., softcap: Optional[float] = ...,
                temperature: float = ..., return_entropy: Literal[False] = ..., backend: str = ...,
                shift: Union[bool, int] = ..., vocab_group=...) -> LogpLse: ...


@overload
def token_stats(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                bias: Optional[torch.Tensor] = ..., ignore_index: int = ..., softcap: Optional[float] = ...,
                temperature: float = ..., return_entropy: Literal[True], backend: str = ...,
                shift: Union[bool, int] = ..., vocab_group=...) -> TokenStats: ...


def token_stats(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                bias: Optional[torch.Tensor] = None, ignore_index: int = -100,
                softcap: Optional[float] = None, temperature: float = 1.0,
                return_entropy: bool = False, backend: str = "auto", shift: Union[bool, int] = False,
                vocab_group=None) -> Union[LogpLse, TokenStats]:
    """Fused LM head + log-softmax statistics, without storing the ``[N, V]`` logits.

    Args:
        hidden: ``[..., H]`` float32/bfloat16/float16/float64 hidden states.
        weight: ``[V, H]`` LM-head weight (``nn.Linear(H, V).weight``), same dtype as ``hidden``.
        labels: ``[...]`` int32/int64 targets in ``[0, V)`` or ``ignore_index``.
        bias: optional ``[V]`` bias.
        softcap: optional logit soft-cap ``c``: ``z = c * tanh(z / c)`` (Gemma 2).
        temperature: logits are divided by it after the soft-cap.
        return_entropy: also return the per-token entropy of ``softmax(z)``.
        backend: "auto", "torch", or any name in :func:`fdiv_kernels.available_backends`.
        shift: the causal-LM shift of :func:`loss` (``True``/1 or ``k`` positions; ``labels =
            input_ids [..., T]``; the outputs have ``T - k`` positions, aligned with ``fk.loss``'s).
        vocab_group: a vocabulary-parallel head, as in :func:`loss` (``weight``, ``bias``: this
            rank's shard; the statistics are the whole head's on every rank).

    Returns:
        ``(logp, lse)`` (a :class:`~fdiv_kernels.LogpLse`), or with ``return_entropy=True`` a
        :class:`~fdiv_kernels.TokenStats` ``(logp, lse, entropy)``; each with the shape of
        ``labels``, float32 (float64 for float64 inputs), 0 at ignored positions, where
        ``z = hidden @ weight.T + bias``, ``lse = logsumexp(z)`` and ``logp = z[label] - lse``.
        Gradients flow to ``hidden``, ``weight`` and ``bias``.

    Logits of -inf (a vocabulary masked through ``bias``) add exact zeros to every output and
    gradient. ``ValueError`` (data checks, :mod:`fdiv_kernels.checks`): a supervised token whose
    logits are all -inf or not finite, or whose label's logit is -inf.
    """
    head = HeadSpec(softcap, temperature, backend)
    if shift:
        checks.check_labels_dtype(labels)
        hidden, labels, _ = shift_for_causal_lm(hidden, labels, None, shift)
    weight, bias, head = _sharded_head(hidden, weight, bias, labels, None, vocab_group, head)
    checks.check_head(hidden, weight, labels, bias)
    prims = primitives()
    labels = prims.check_labels(labels, _vocab_size(weight, head), ignore_index)
    logp, lse, ent = prims.token_stats(hidden, weight, bias, labels,
                                       TokenStatsParams(head, ignore_index, bool(return_entropy)))
    return stats_result(*prims.check_token_stats(logp, lse, ent, labels, head))


@overload
def token_stats_from_logits(logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = ...,
                            return_entropy: Literal[False] = ..., softcap: Optional[float] = ...,
                            temperature: float = ...) -> LogpLse: ...


@overload
def token_stats_from_logits(logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = ...,
                            return_entropy: Literal[True], softcap: Optional[float] = ...,
                            temperature: float = ...) -> TokenStats: ...


def token_stats_from_logits(logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100,
                            return_entropy: bool = False, softcap: Optional[float] = None,
                            temperature: float = 1.0) -> Union[LogpLse, TokenStats]:
    """:func:`token_stats` for users who already hold ``logits [..., V]`` (same return types), with
    the same ``softcap`` and ``temperature`` (applied to the logits: ``cap(logits) / T``).

    Plain torch autograd in float32 (float64 for float64 logits): the logits are upcast, so
    bf16/fp16 logits of any magnitude give finite results.
    """
    head = HeadSpec(softcap, temperature)
    checks.check_logits(logits, labels)
    prims = primitives()
    labels = prims.check_labels(labels, logits.shape[-1], ignore_index)
    logp, lse, ent = _stats_from_logits(head_logits(logits, head), labels, ignore_index, return_entropy)
    return stats_result(*prims.check_token_stats(logp, lse, ent, labels, HeadSpec()))


def sequence_logp(hidden: Optional[torch.Tensor] = None, weight: Optional[torch.Tensor] = None,
                  labels: Optional[torch.Tensor] = None, *, logits: Optional[torch.Tensor] = None,
                  bias: Optional[torch.Tensor] = None, ignore_index: int = -100,
                  softcap: Optional[float] = None, temperature: float = 1.0,
                  backend: str = "auto", shift: Union[bool, int] = False, vocab_group=None) -> SequenceLogp:
    """Per-row sum and mean of ``log pi(y_t | s_t)`` over supervised tokens, from the fused primitive.

    ``labels [..., T]`` -> ``sum``, ``mean`` (float32) and ``count`` (int64), each ``[...]``.
    All-ignored rows give sum = mean = 0. Log space only: no sequence probability is formed.
    ``shift``: the causal-LM shift of :func:`loss`; ``vocab_group``: a vocabulary-parallel head,
    as in :func:`loss`.
    """
    if shift:
        hidden, logits, labels, _ = _shifted(hidden, logits, labels, None, shift)
    _one_input(hidden, weight, labels, logits, bias)
    checks.check_rows(labels)
    if logits is not None:
        checks.check_vocab_layout(hidden, weight, bias, logits, vocab_group, compiled.compiling())
        stats = token_stats_from_logits(logits, labels, ignore_index=ignore_index, softcap=softcap,
                                        temperature=temperature)
    else:
        stats = token_stats(hidden, weight, labels, bias=bias, ignore_index=ignore_index, softcap=softcap,
                            temperature=temperature, backend=backend, vocab_group=vocab_group)
    count = (labels != ignore_index).sum(dim=-1)
    s = stats.logp.sum(dim=-1)
    return SequenceLogp(s, s / count.clamp(min=1).to(s.dtype), count)
