"""The test suite's one float64 oracle and one input builder.

Oracle: plain float64 torch on full logits, written from the formulas of ``docs/math.md`` and
TRL's published DPO losses, sharing no code path with the package (it imports ``fdiv_kernels``
only to turn a divergence alias into its canonical name). Gradients come from autograd on the
oracle's float64 leaves (:func:`leaves64`).

* :func:`logits`, :func:`stats`, :func:`token_stats`: ``z = cap(h W^T + b) / T``; per token
  ``logp = z_y - lse``, ``lse = logsumexp(z)``, ``entropy = -sum p log p`` (``0 log 0 = 0`` on
  ``-inf`` columns), 0 at ignored positions.
* :func:`objective`, :func:`primal`, :func:`fdiv_loss`: ``fk.loss``'s objectives for every
  divergence x level x values x reduction x z_loss x length normalisation, and the primal form.
* :func:`sequence_logp`, :func:`dpo_losses`, :func:`dpo_pair_loss`: per-row log-probs and the
  DPO family per TRL (``trl/trainer/dpo_trainer.py``; SimPO from ``trl/experimental/cpo``; ORPO's
  odds ratio from ``trl/experimental/orpo``), transcribed; :func:`kto_losses` (``trl/trainer/kto_trainer.py``).
* :func:`trl_dpo_loss`, :func:`trl_kto_loss`: TRL 1.16's own ``DPOTrainer._compute_loss`` /
  ``KTOTrainer._compute_loss`` run on given per-token log-probs (a stand-in model and trainer
  object; no model, no data pipeline): the peer's code itself, in float64.
  DPO family per TRL (``trl/trainer/dpo_trainer.py``; SimPO from ``trl/experimental/cpo``).
* :func:`distill_divergence`, :func:`distill_loss`: ``fk.distill_loss``, ``D_f(P_t || P_s) =
  sum_v p_s f(p_t / p_s)`` from each generator ``f`` (with ``f(0)`` and ``lim f(r)/r`` where one
  distribution is 0), plus the hard-label cross-entropy.

Builder: :func:`make_inputs` returns an :class:`Inputs` (hidden, weight, bias, labels, per-token
reference, masked columns, three per-token coefficients), every knob a keyword with a default.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

import fdiv_kernels as fk

IGNORE = -100
LOG2 = math.log(2.0)
#: divergences whose fk.loss is ``log mean psi`` (Donsker-Varadhan form), not ``mean(-phi)``
LOG_MEAN_EXP = ("kl", "squared_hellinger")
#: DPO kinds that TRL scores with average (length-normalised) log-probs
MEAN_LOGP_KINDS = ("ipo", "simpo", "sigmoid_norm", "orpo")
#: DPO kinds without a reference
NO_REFERENCE_KINDS = ("simpo", "orpo", "sft")


# ---------------------------------------------------------------------------------------------
# The input builder
# ---------------------------------------------------------------------------------------------

@dataclass
class Inputs:
    """One drawn batch. Shapes: ``hidden [*lead, T, H]``, ``weight [V, H]``, ``bias [V]`` or None,
    ``labels [*lead, T]`` (int64, ``IGNORE`` where unsupervised), ``ref [*lead, T]`` per-token
    reference log-probs (float32, <= 0) or None, ``masked [V]`` bool (columns set to ``-inf``
    through the bias), ``coef``: three ``[*lead, T]`` float32 weights for a linear functional of
    ``(logp, lse, entropy)``."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    labels: torch.Tensor
    ref: torch.Tensor | None
    masked: torch.Tensor
    coef: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    teacher_hidden: torch.Tensor | None = None
    teacher_weight: torch.Tensor | None = None
    teacher_bias: torch.Tensor | None = None

    def leaves(self, dtype: torch.dtype | None = None, bias: bool = True):
        """Fresh ``(hidden, weight, bias)`` copies (in ``dtype`` if given) that require grad."""
        def leaf(t):
            return None if t is None else t.detach().to(dtype or t.dtype).clone().requires_grad_()
        return leaf(self.hidden), leaf(self.weight), leaf(self.bias) if bias else None

    def ref_per_row(self) -> torch.Tensor:
        """The reference summed over each row's supervised tokens (``[*lead]``, sequence level)."""
        return torch.where(self.labels != IGNORE, self.ref, 0.0).sum(-1)


def make_inputs(lead: Sequence[int] = (3,), t: int = 9, h: int = 16, v: int = 37, *,
                dtype: torch.dtype = torch.float32, seed: int = 0, scale: float = 1.0,
                weight_scale: float | None = None, bias: bool = False, bias_scale: float = 0.5,
                ignore_frac: float = 0.0, ignore_prefix: int = 0, ignore_suffix: int = 0,
                ignore_rows: Sequence[int] = (), ignore_at: Sequence[tuple[int, ...]] = (),
                keep_first: int = 0, edge_labels: bool = False, mask: Sequence[int] = (),
                ref_scale: float | None = 3.0, ref_spread: float = 0.0, teacher: int | None = None,
                teacher_mask: Sequence[int] = (), teacher_scale: float = 1.5, device="cpu") -> Inputs:
    """A batch for ``fk.token_stats`` / ``fk.loss`` (see :class:`Inputs`).

    Args:
        lead, t, h, v: leading (row) dims, tokens per row, hidden size, vocabulary size; ``lead=()``
            gives 1-D labels ``[T]``.
        dtype: of hidden, weight and bias (drawn in float32, then cast: a bf16 batch is the
            rounding of the float32 one). Labels are int64, references and coefficients float32.
        seed: of a private ``torch.Generator`` (the global RNG is never touched).
        scale: hidden entries are ``N(0, scale^2)``; ``weight_scale`` (default ``1/sqrt(h)``)
            multiplies ``N(0, 1)`` weights, so logits are ``O(scale)``.
        bias, bias_scale: a ``N(0, bias_scale^2)`` bias over the vocabulary.
        ignore_frac: each label is ``IGNORE`` with this probability; ``ignore_prefix``/
            ``ignore_suffix`` ignore the first/last tokens of every row; ``ignore_rows`` whole rows
            (indices into the flattened rows); ``ignore_at`` single positions; ``keep_first``
            keeps the first flattened positions supervised whatever else says.
        edge_labels: the first label is the last unmasked column (``V-1``: the last, partial tile)
            and the second the first one (``0``).
        mask: vocabulary columns masked with a ``-inf`` bias (implies ``bias``); labels avoid them
            (unless every column is masked).
        ref_scale: references are ``-U(0, ref_scale)``; ``None`` for no reference.
        ref_spread: adds ``spread * r * (-1)^r`` to row ``r``'s reference (rows far apart in reward).
        teacher: ``H_t``: also a teacher (``teacher_hidden [*lead, T, H_t]``, ``teacher_weight [V, H_t]``
            scaled like the student's times ``teacher_scale``, a ``N(0, bias_scale^2)`` ``teacher_bias``),
            drawn after everything else (the student's tensors do not depend on it);
            ``teacher_mask``: vocabulary columns the teacher masks with a ``-inf`` bias.
        device: where the tensors are put.
    """
    g = torch.Generator().manual_seed(seed)
    lead = tuple(lead)
    shape = lead + (t,)
    hidden = torch.randn(*shape, h, generator=g) * scale
    weight = torch.randn(v, h, generator=g) * (h ** -0.5 if weight_scale is None else weight_scale)
    masked = torch.zeros(v, dtype=torch.bool)
    masked[list(mask)] = True
    b = torch.randn(v, generator=g) * bias_scale if bias or len(mask) else None
    if b is not None:
        b[masked] = -math.inf
    keep = (~masked).nonzero().squeeze(1) if not masked.all() else torch.arange(v)  # all masked: any column
    labels = keep[torch.randint(0, max(keep.numel(), 1), shape, generator=g) % max(keep.numel(), 1)]
    flat = labels.view(-1)
    if edge_labels and flat.numel():
        flat[0] = keep[-1]
        if flat.numel() > 1:
            flat[1] = keep[0]
    drop = torch.rand(shape, generator=g) < ignore_frac
    if ignore_prefix:
        drop[..., :ignore_prefix] = True
    if ignore_suffix:
        drop[..., t - ignore_suffix:] = True
    rows = drop.view(math.prod(lead), t)
    for r in ignore_rows:
        rows[r] = True
    for pos in ignore_at:
        drop[pos] = True
    drop.view(-1)[:keep_first] = False
    labels[drop] = IGNORE
    ref = None
    if ref_scale is not None:
        ref = -torch.rand(shape, generator=g) * ref_scale
        if ref_spread:
            r = torch.arange(rows.shape[0], dtype=torch.float32)
            ref = ref + (ref_spread * r * (-1) ** r).view(shape[:-1] + (1,))
    coef = tuple(torch.randn(shape, generator=g) for _ in range(3))
    th = tw = tb = None
    if teacher is not None:
        th = torch.randn(*shape, teacher, generator=g) * scale
        tw = torch.randn(v, teacher, generator=g) * teacher ** -0.5 * teacher_scale
        tb = torch.randn(v, generator=g) * bias_scale
        tb[list(teacher_mask)] = -math.inf

    def put(x):
        return None if x is None else x.to(device)

    def cast(x):
        return None if x is None else x.to(dtype).to(device)

    return Inputs(cast(hidden), cast(weight), cast(b), put(labels), put(ref), masked, tuple(put(c) for c in coef),
                  cast(th), cast(tw), cast(tb))


# ---------------------------------------------------------------------------------------------
# Token statistics
# ---------------------------------------------------------------------------------------------

class Stats(NamedTuple):
    """``[..., T]`` per-token statistics (float64 unless asked otherwise), 0 at ignored positions."""

    logp: torch.Tensor
    lse: torch.Tensor
    entropy: torch.Tensor


def leaves64(*tensors):
    """float64 copies that require grad (``None`` stays ``None``): the oracle's autograd leaves."""
    return tuple(None if x is None else x.detach().double().requires_grad_() for x in tensors)


def logits(hidden, weight, bias=None, softcap: float | None = None, temperature: float = 1.0,
           dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``cap(h W^T + b) / T``, ``cap(x) = c tanh(x / c)``, computed in ``dtype`` (float64: the
    oracle; a 16-bit dtype: what plain torch computes in that dtype, a baseline to compare with)."""
    z = hidden.to(dtype) @ weight.to(dtype).T
    if bias is not None:
        z = z + bias.to(dtype)
    return transform(z, softcap, temperature)


def transform(z: torch.Tensor, softcap: float | None = None, temperature: float = 1.0) -> torch.Tensor:
    """``cap(z) / T`` of raw logits, ``cap(x) = c tanh(x / c)`` (none without ``softcap``)."""
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature


def stats(z: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE) -> Stats:
    """``(logp, lse, entropy)`` of logits ``z [..., T, V]`` in their dtype (differentiable)."""
    valid = labels != ignore_index
    logq = torch.log_softmax(z, -1)
    lse = torch.logsumexp(z, -1)
    logp = logq.gather(-1, torch.where(valid, labels, 0).long()[..., None]).squeeze(-1)
    ent = -(logq.exp() * torch.where(torch.isfinite(logq), logq, 0.0)).sum(-1)
    zero = z.new_zeros(())
    return Stats(torch.where(valid, logp, zero), torch.where(valid, lse, zero), torch.where(valid, ent, zero))


def token_stats(hidden, weight, labels, bias=None, softcap=None, temperature=1.0, ignore_index=IGNORE,
                dtype: torch.dtype = torch.float64) -> Stats:
    """What ``fk.token_stats(..., return_entropy=True)`` computes, on full logits in ``dtype``."""
    return stats(logits(hidden, weight, bias, softcap, temperature, dtype), labels, ignore_index)


def functional(st, coef) -> torch.Tensor:
    """``sum(cg logp + ck lse + ce entropy)``: one scalar whose gradient exercises all three."""
    cg, ck, ce = coef
    total = (cg * st.logp).sum() + (ck * st.lse).sum()
    return total if st.entropy is None else total + (ce * st.entropy).sum()


def sequence_logp(st: Stats, labels, ignore_index=IGNORE):
    """``(sum, mean, count)`` of the label log-probs of each row (``mean = sum / max(count, 1)``)."""
    m = labels != ignore_index
    s = torch.where(m, st.logp, 0.0).sum(-1)
    n = m.sum(-1)
    return s, s / n.clamp(min=1), n


# ---------------------------------------------------------------------------------------------
# fk.loss
# ---------------------------------------------------------------------------------------------

def log_softplus(u: torch.Tensor) -> torch.Tensor:
    """``log(log(1 + e^u))`` without underflow: ``u + log(log1p(x) / x)``, ``x = e^u``, for ``u < 0``."""
    x = torch.exp(torch.clamp(u, max=0.0))
    ratio = torch.where(x > 0, torch.log1p(x) / torch.where(x > 0, x, 1.0), 1.0)
    return torch.where(u < 0, u + torch.log(ratio), torch.log(F.softplus(torch.clamp(u, min=0.0))))


def objective(name: str, u: torch.Tensor) -> torch.Tensor:
    """Per element ``-phi(u)`` (the loss of one reward ``u``) in float64; for KL and squared
    Hellinger this is also ``psi(u) - offset`` (``psi = exp(-u-1)``, ``1/softplus(u)``)."""
    lsp = log_softplus(u)
    return {
        "tv": -u,
        "reverse_kl": -(1 + lsp),
        "pearson": -torch.where(u <= 2, u - u * u / 4, torch.ones_like(u)),
        "neyman": -(2 * torch.exp(0.5 * lsp) - 2),
        "js": -(LOG2 - F.softplus(-u)),
        "kl": torch.exp(-u - 1),
        "squared_hellinger": torch.exp(-lsp) - 1,
    }[name]


def log_psi(name: str, u: torch.Tensor) -> torch.Tensor:
    """``log psi(u)``, the terms whose log-mean-exp is the KL / squared Hellinger loss."""
    return {"kl": -u - 1, "squared_hellinger": -log_softplus(u)}[name]


#: f-divergence generators (``f(0)`` finite) for the primal form ``D_f(onehot(y) || p)``
_GENERATORS = {
    "kl": lambda x, a: torch.where(x > 0, x * torch.log(x), torch.zeros_like(x)),
    "tv": lambda x, a: (x - 1).abs() / 2,
    "pearson": lambda x, a: (x - 1) ** 2,
    "squared_hellinger": lambda x, a: (torch.sqrt(x) - 1) ** 2,
    "js": lambda x, a: torch.where(x > 0, x * torch.log(x), torch.zeros_like(x)) - (1 + x) * torch.log((1 + x) / 2),
    "alpha": lambda x, a: (x ** a - 1 - a * (x - 1)) / (a * (a - 1)),
}


def primal(name: str, logp: torch.Tensor, alpha: float = 1.5) -> torch.Tensor:
    """``D_f(onehot(y) || p) = p f(1/p) + (1 - p) f(0)``, ``p = exp(logp)`` (float64, from the
    definition; exact for moderate ``logp``: the package continues some forms linearly below
    ``log 1e-8``)."""
    f = _GENERATORS[name]
    p = torch.exp(logp.double())
    return p * f(1 / p, alpha) + (1 - p) * f(torch.zeros_like(p), alpha)


def canonical(divergence: str) -> str:
    """The registry name of a divergence alias (``"sft"`` -> ``"tv"``)."""
    return fk.get_divergence(divergence).name


def fdiv_loss(st: Stats, labels, *, divergence="sft", ref_logp=None, beta=1.0, level="token", values="drop",
              length_normalize=False, reduction="mean", z_loss=0.0, form="variational", alpha=1.5,
              ignore_index=IGNORE) -> torch.Tensor:
    """``fk.loss``'s value from float64 statistics (``docs/math.md`` sections 2-3), row by row.

    Per row with supervised positions ``s_0 .. s_n`` and ``lr_i = logp - ref`` there:
    token level ``u_i = beta lr_i + dV_i`` with ``dV_i = V(s_i) - V(s_{i+1})`` (0 for the last);
    sequence level ``u = beta sum_i lr_i (/ n with length_normalize) - ref_row + V(s_0) - V(s_n)``;
    ``V = lse``, dropped (``values="drop"``), detached (``"detach"``) or with gradient (``"free"``,
    which also adds ``+V(s_0)`` per row). Loss ``mean/sum(-phi(u))`` over units (tokens or rows),
    ``log mean/sum psi(u)`` for KL and squared Hellinger, ``-phi(u)`` per unit for
    ``reduction="none"``; plus ``z_loss * mean/sum(lse^2)`` over tokens. 0 when nothing is supervised.
    """
    t = labels.shape[-1]
    mask = (labels != ignore_index).reshape(-1, t)
    logp, lse = st.logp.reshape(-1, t), st.lse.reshape(-1, t)
    zero = logp.new_zeros(())
    n_tok = mask.sum()
    n_rows = mask.any(1).sum()

    def reduce(total, count):
        return total if reduction == "sum" else total / max(int(count), 1)

    if form == "primal":
        per = torch.where(mask, primal(divergence, logp, alpha), zero)
        if reduction == "none":
            return per.reshape(labels.shape)
        out = reduce(per.sum(), n_tok)
    else:
        name = canonical(divergence)
        per_row_ref = ref_logp is not None and ref_logp.shape != labels.shape
        ref_tok = torch.zeros_like(logp) if ref_logp is None or per_row_ref else ref_logp.double().reshape(-1, t)
        ref_row = ref_logp.double().reshape(-1) if per_row_ref else None
        us, unit_rows, unit_pos, free = [], [], [], zero
        for r in range(mask.shape[0]):
            pos = mask[r].nonzero().squeeze(1)
            if pos.numel() == 0:
                continue
            lr = logp[r, pos] - ref_tok[r, pos]
            v = lse[r, pos] if values == "free" else lse[r, pos].detach()
            if values == "free":
                free = free + v[0]
            if level == "token":
                dv = torch.cat([v[:-1] - v[1:], v.new_zeros(1)]) if values != "drop" else 0.0
                us.append(beta * lr + dv)
                unit_rows.extend([r] * pos.numel())
                unit_pos.extend(pos.tolist())
            else:
                s = lr.sum() / (pos.numel() if length_normalize else 1)
                if ref_row is not None:
                    s = s - ref_row[r]
                us.append((beta * s + (v[0] - v[-1] if values != "drop" else 0.0)).reshape(1))
                unit_rows.append(r)
        u = torch.cat(us) if us else logp.new_zeros(0)
        n_units = n_tok if level == "token" else n_rows
        if reduction == "none":
            if level == "token":
                out = logp.new_zeros(mask.shape).index_put((torch.tensor(unit_rows, dtype=torch.long),
                                                            torch.tensor(unit_pos, dtype=torch.long)), objective(name, u))
                return out.reshape(labels.shape)
            out = logp.new_zeros(mask.shape[:1]).index_put((torch.tensor(unit_rows, dtype=torch.long),), objective(name, u))
            return out.reshape(labels.shape[:-1])
        if name in LOG_MEAN_EXP:
            lme = torch.logsumexp(log_psi(name, u), 0)
            out = (lme if reduction == "sum" else lme - math.log(int(n_units))) if u.numel() else zero
        else:
            out = reduce(objective(name, u).sum(), n_units)
        out = out + reduce(free, n_rows)
    if z_loss:
        out = out + z_loss * reduce(torch.where(mask, lse * lse, zero).sum(), n_tok)
    return out


def cross_entropy(z: torch.Tensor, labels, *, class_weight=None, label_smoothing: float = 0.0,
                  reduction: str = "mean", ignore_index=IGNORE) -> torch.Tensor:
    """PyTorch's ``F.cross_entropy(weight=, label_smoothing=)`` on full logits ``z [..., T, V]``
    (float64 in the tests): per token ``(1 - eps) c[y] (-log p_y) + (eps / V) sum_v c_v (-log p_v)``,
    a mean divides by ``sum c[y]`` over the supervised tokens; ``reduction="none"`` in the labels' shape."""
    v = z.shape[-1]
    c = None if class_weight is None else class_weight.to(z.dtype)
    out = F.cross_entropy(z.reshape(-1, v), labels.reshape(-1), weight=c, ignore_index=ignore_index,
                                            reduction=reduction, label_smoothing=label_smoothing)
    return out.reshape(labels.shape) if reduction == "none" else out


def class_options_loss(z: torch.Tensor, labels, *, divergence="sft", beta=1.0, ref_logp=None, class_weight=None,
                       label_smoothing: float = 0.0, reduction: str = "mean", ignore_index=IGNORE) -> torch.Tensor:
    """``fk.loss`` (token level, ``values="drop"``) with the cross-entropy options
    (``docs/math.md`` section 3), from the formula on full logits: per supervised token
    ``(1 - eps) c[y] (-phi(u)) + eps U``, ``u = beta (log p_y - ref)``,
    ``U = -(1/V) sum_v c_v log p_v``; a mean divides by ``sum c[y]`` (0 when that is 0)."""
    v = z.shape[-1]
    mask = labels != ignore_index
    st = stats(z, labels, ignore_index)
    logq = torch.log_softmax(z, -1)
    c = torch.ones(v, dtype=z.dtype) if class_weight is None else class_weight.to(z.dtype)
    w = c[torch.where(mask, labels, 0)]
    u = beta * (st.logp - (0.0 if ref_logp is None else ref_logp.to(z.dtype)))
    per = (1.0 - label_smoothing) * w * objective(canonical(divergence), u)
    per = per + label_smoothing * (-torch.where(c > 0, logq * c, 0.0).sum(-1) / v)  # a class of weight 0: nothing
    per = torch.where(mask, per, z.new_zeros(()))
    if reduction == "none":
        return per
    if reduction == "sum":
        return per.sum()
    d = torch.where(mask, w, 0.0).sum()
    return per.sum() / d if float(d) > 0 else per.sum() * 0


# ---------------------------------------------------------------------------------------------
# DPO (TRL's formulas)
# ---------------------------------------------------------------------------------------------

def _f_score(f: str, logratio: torch.Tensor, a: float) -> torch.Tensor:
    """TRL 1.16 DPOTrainer's f-divergence scores of a log-ratio (its code, transcribed)."""
    if f == "forward_kl":
        return 1 - torch.exp(-logratio)
    if f == "js":
        return LOG2 + F.logsigmoid(logratio)
    return (torch.exp(torch.clamp((a - 1) * logratio, max=80.0)) - 1.0) / (a - 1.0)


def dpo_kind_options(kind: str, label_smoothing: float = 0.1) -> dict:
    """Options that make ``kind`` valid and cross what it reads: ``label_smoothing`` for the kinds
    that read it (exo_pair's epsilon at least 1e-3), the SimPO margin, DiscoPOP's temperature."""
    row = fk.DPO_LOSS_TYPES[kind]
    ls = label_smoothing if row.uses_label_smoothing else 0.0
    if kind == "exo_pair":
        ls = max(ls, 1e-3)
    return {"label_smoothing": ls, "gamma": 0.5 if kind == "simpo" else 0.0,
            "discopop_tau": 0.05 if kind == "discopop" else 0.05}


def _smooth(x: torch.Tensor, ls: float) -> torch.Tensor:
    return -F.logsigmoid(x) * (1 - ls) - F.logsigmoid(-x) * ls


def dpo_losses(kind: str, pc, pr, rc=None, rr=None, *, beta: float, label_smoothing: float = 0.0,
               gamma: float = 0.0, f_divergence: str = "reverse_kl", f_alpha: float = 0.5, discopop_tau: float = 0.05,
               nll=None) -> torch.Tensor:
    """Per-pair DPO-family losses as TRL publishes them, from the policy's (``pc``, ``pr``) and the
    reference's (``rc``, ``rr``) sequence log-probs of the chosen/rejected responses (the
    ``per_sequence_loss`` branches of ``DPOTrainer._compute_loss``, trl/trainer/dpo_trainer.py,
    TRL 1.16, transcribed; ipo and sigmoid_norm take length-averaged inputs here).

    ``sigmoid`` is the cDPO form with label smoothing (TRL <= 0.2x; ``ls = 0`` is TRL 1.x's), the
    other f-divergences replace the log-ratios by TRL's scores; ``simpo`` (CPOTrainer.cpo_loss) and
    ``orpo`` (ORPOTrainer.odds_ratio_loss, in float64) need no reference; ``sft`` is ``nll`` (the
    batch's mean NLL of the chosen tokens) for every pair."""
    ls = label_smoothing
    if kind == "simpo":
        x = (pc - pr) - gamma / beta
        return -F.logsigmoid(beta * x) * (1 - ls) - F.logsigmoid(-beta * x) * ls
    if kind == "orpo":  # trl/experimental/orpo/orpo_trainer.py: odds_ratio_loss and log1mexp
        def log1mexp(x):
            return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))
        log_odds = (pc - pr) - (log1mexp(pc) - log1mexp(pr))
        return -beta * F.logsigmoid(log_odds)  # the ORPO loss is nll - mean(beta * logsigmoid(log_odds))
    if kind == "sft":
        return nll.expand(pc.shape)
    if rc is None:  # reference-free (TRL's CPOTrainer; Liger's use_ref_model=False: a zero reference)
        rc = rr = torch.zeros_like(pc)
    if f_divergence == "reverse_kl":
        cs, rs = pc - rc, pr - rr
    else:
        cs, rs = _f_score(f_divergence, pc - rc, f_alpha), _f_score(f_divergence, pr - rr, f_alpha)
    h = cs - rs
    a, b = pc - rc, pr - rr
    if kind == "sigmoid":
        return -F.logsigmoid(beta * h) * (1 - ls) - F.logsigmoid(-beta * h) * ls
    if kind == "robust":
        return (-(1 - ls) * F.logsigmoid(beta * h) + ls * F.logsigmoid(-beta * h)) / (1 - 2 * ls)
    if kind == "hinge":
        return torch.relu(1 - beta * h)
    if kind in ("ipo",):
        return (h - 1 / (2 * beta)) ** 2
    if kind == "exo_pair":
        eps = torch.tensor(ls, dtype=h.dtype)
        qw, ql = torch.sigmoid(beta * h), torch.sigmoid(-beta * h)
        return qw * (F.logsigmoid(beta * h) - torch.log1p(-eps)) + ql * (F.logsigmoid(-beta * h) - torch.log(eps))
    if kind == "nca_pair":
        return -F.logsigmoid(beta * a) - 0.5 * F.logsigmoid(-beta * a) - 0.5 * F.logsigmoid(-beta * b)
    if kind == "bco_pair":
        return -F.logsigmoid(beta * a) - F.logsigmoid(-beta * b)
    if kind == "sppo_hard":
        return (a - 0.5 / beta) ** 2 + (b + 0.5 / beta) ** 2
    if kind == "aot":
        delta = torch.sort(pc - pr, dim=0)[0] - torch.sort(rc - rr, dim=0)[0]
        return _smooth(beta * delta, ls)
    if kind == "aot_unpaired":
        delta = torch.sort(a, dim=0)[0] - torch.sort(b, dim=0)[0]
        return _smooth(beta * delta, ls)
    if kind == "apo_zero":
        return 1 - torch.sigmoid(beta * a) + torch.sigmoid(beta * b)
    if kind == "apo_down":
        return torch.sigmoid(beta * a) + 1 - torch.sigmoid(beta * (a - b))
    if kind == "discopop":
        logits = beta * h
        m = torch.sigmoid(logits / discopop_tau)
        return -F.logsigmoid(logits) * (1 - m) + torch.exp(-logits) * m
    if kind == "sigmoid_norm":
        return -F.logsigmoid(beta * h)
    raise AssertionError(f"no oracle for DPO kind {kind!r}")


def dpo_pair_loss(st: Stats, labels, ref_seq=None, *, kind, beta: float, loss_weights=None,
                  length_normalize=None, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean loss, per-pair losses)`` of rows laid out ``[chosen_0..chosen_{b-1}, rejected_0..]``
    (what ``fk.nn.FusedLinearDPOLoss`` takes), ``ref_seq [2b]`` per-row reference log-probs in the
    same layout; ipo/simpo/sigmoid_norm/orpo use mean log-probs (TRL's ``average_log_prob``).
    ``kind``: a name or a list, summed with ``loss_weights``; ``sft`` adds the chosen tokens' mean NLL."""
    kinds = [kind] if isinstance(kind, str) else list(kind)
    weights = [1.0] * len(kinds) if loss_weights is None else list(loss_weights)
    s, mean, n = sequence_logp(st, labels)
    b = s.shape[0] // 2
    nll = -s[:b].sum() / n[:b].sum().clamp(min=1)
    total = 0.0
    for k, w in zip(kinds, weights):
        ln = (k in MEAN_LOGP_KINDS) if length_normalize is None else length_normalize
        seq = mean if ln else s
        rc, rr = (None, None) if ref_seq is None else (ref_seq[:b].double(), ref_seq[b:].double())
        total = total + w * dpo_losses(k, seq[:b], seq[b:], rc, rr, beta=beta, nll=nll, **kw)
    return total.mean(), total


def kto_losses(kind: str, s, ref, desirable, *, beta: float, kl: float = 0.0, desirable_weight: float = 1.0,
               undesirable_weight: float = 1.0) -> torch.Tensor:
    """Per-row KTO losses (``KTOTrainer._compute_loss``, trl/trainer/kto_trainer.py, TRL 1.16,
    transcribed): rows in their order (TRL concatenates chosen then rejected; the mean is the same)."""
    lr = s if ref is None else s - ref
    if kind == "kto":
        chosen = 1 - torch.sigmoid(beta * (lr - kl))
        rejected = 1 - torch.sigmoid(beta * (kl - lr))
    else:  # apo_zero_unpaired
        chosen = 1 - torch.sigmoid(beta * lr)
        rejected = torch.sigmoid(beta * lr)
    return torch.where(desirable, desirable_weight * chosen, undesirable_weight * rejected)


class _Acc:
    """The accelerator calls of TRL's loss functions, on one process."""

    device = torch.device("cpu")

    @staticmethod
    def gather_for_metrics(t):
        return t.reshape(-1) if torch.is_tensor(t) else t

    gather = gather_for_metrics

    @staticmethod
    def unwrap_model(m):
        return m


def _trainer_self(**fields):
    from collections import defaultdict
    from types import SimpleNamespace
    return SimpleNamespace(model=SimpleNamespace(training=True), accelerator=_Acc(), aux_loss_enabled=False,
                           _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0,
                           _tp_size=1, precompute_ref_logps=True, **fields)


def _model_out(log_probs):
    from types import SimpleNamespace
    z = torch.zeros_like(log_probs)
    return SimpleNamespace(log_probs=log_probs, entropy=z, mean_logits=z, is_top1=z.bool(), aux_loss=None)


def trl_dpo_loss(per_token_logps, mask, ref_chosen, ref_rejected, *, loss_type, beta: float,
                 loss_weights=None, label_smoothing: float = 0.0, f_divergence_type: str = "reverse_kl",
                 f_alpha_divergence_coef: float = 0.5, discopop_tau: float = 0.05) -> torch.Tensor:
    """TRL 1.16's ``DPOTrainer._compute_loss`` itself on ``per_token_logps [2B, L]`` (chosen rows
    first; 0 where ``mask [2B, L]`` is False) with precomputed reference sums ``[B]``: the loss TRL
    back-propagates (differentiable in ``per_token_logps``)."""
    from trl import DPOTrainer

    types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    me = _trainer_self(ld_alpha=None, f_divergence_type=f_divergence_type,
                       f_alpha_divergence_coef=f_alpha_divergence_coef, loss_types=types,
                       loss_weights=list(loss_weights) if loss_weights else [1.0] * len(types), beta=beta,
                       label_smoothing=label_smoothing, use_weighting=False,
                       args=__import__("types").SimpleNamespace(discopop_tau=discopop_tau))
    rows = per_token_logps.shape[0]
    completion = torch.cat([torch.zeros(rows, 1, dtype=torch.long), mask.long()], dim=1)  # the prompt token
    inputs = {"input_ids": torch.zeros_like(completion), "attention_mask": torch.ones_like(completion),
              "completion_mask": completion, "ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected}
    logps = torch.where(mask, per_token_logps, per_token_logps.new_zeros(()))
    return DPOTrainer._compute_loss(me, lambda **kw: _model_out(logps), inputs, False)


def trl_kto_loss(per_token_logps, mask, ref_logps, desirable, *, beta: float, loss_type: str = "kto",
                 kl_policy=None, kl_ref=None, desirable_weight: float = 1.0,
                 undesirable_weight: float = 1.0) -> torch.Tensor:
    """TRL 1.16's ``KTOTrainer._compute_loss`` itself on ``per_token_logps [B, L]`` (0 where ``mask``
    is False), precomputed reference sums ``ref_logps [B]``, ``desirable [B]`` (TRL's ``label``) and,
    for ``kto``, the KL completions' policy and reference sums ``kl_policy``, ``kl_ref`` ``[B]``."""
    from trl import KTOTrainer

    calc = loss_type != "apo_zero_unpaired"
    me = _trainer_self(beta=beta, loss_type=loss_type, desirable_weight=desirable_weight,
                       undesirable_weight=undesirable_weight, calculate_KL=calc,
                       args=__import__("types").SimpleNamespace(gradient_checkpointing_kwargs=None))
    me._compute_kl_logps = lambda model, batch: KTOTrainer._compute_kl_logps(me, model, batch)
    rows = per_token_logps.shape[0]
    completion = torch.cat([torch.zeros(rows, 1, dtype=torch.long), mask.long()], dim=1)
    logps = torch.where(mask, per_token_logps, per_token_logps.new_zeros(()))
    inputs = {"input_ids": torch.zeros_like(completion), "attention_mask": torch.ones_like(completion),
              "completion_mask": completion, "label": desirable.long(), "ref_logps": ref_logps}
    if calc:
        kl_tokens = torch.zeros(rows, 2, dtype=torch.long)
        inputs.update({"KL_input_ids": kl_tokens + 1, "KL_attention_mask": torch.ones_like(kl_tokens),
                       "KL_completion_mask": torch.ones_like(kl_tokens), "ref_KL_logps": kl_ref})

    def model(input_ids, **kw):  # the KL completions are told apart by their token ids
        return _model_out(kl_policy[:, None].to(logps.dtype) if bool((input_ids == 1).all()) else logps)

    return KTOTrainer._compute_loss(me, model, inputs, False)


# ---------------------------------------------------------------------------------------------
# Distillation
# ---------------------------------------------------------------------------------------------

def _distill_generator(name: str, c: float):
    """``(f, f(0), lim_{r->inf} f(r)/r)`` of a distillation divergence (``c``: js's beta, alpha's a)."""
    inf = math.inf
    if name == "js" and c in (0.0, 1.0):  # TRL / Liger: beta 0 = forward KL, 1 = reverse KL
        name = "kl" if c == 0.0 else "reverse_kl"
    if name == "alpha" and c in (0.0, 1.0):
        name = "reverse_kl" if c == 0.0 else "kl"
    if name == "kl":
        return (lambda r: r * torch.log(r)), 0.0, inf
    if name == "reverse_kl":
        return (lambda r: -torch.log(r)), inf, 0.0
    if name == "js":
        b = c
        return (lambda r: b * r * torch.log(r) - (b * r + 1 - b) * torch.log(b * r + 1 - b)), \
            -(1 - b) * math.log(1 - b), -b * math.log(b)
    if name == "tv":
        return (lambda r: (r - 1).abs() / 2), 0.5, 0.5
    if name == "squared_hellinger":
        return (lambda r: (torch.sqrt(r) - 1) ** 2), 1.0, 1.0
    if name == "pearson":
        return (lambda r: (r - 1) ** 2), 1.0, inf
    if name == "neyman":
        return (lambda r: (1 - r) ** 2 / r), inf, 1.0
    if name == "alpha":
        a = c
        return (lambda r: (r ** a - 1 - a * (r - 1)) / (a * (a - 1))), (1 / a if a > 0 else inf), \
            (1 / (1 - a) if a < 1 else inf)
    raise AssertionError(f"no distillation oracle for {name!r}")


def distill_divergence(zt, zs, name: str, c: float = 0.0, temperature: float = 1.0) -> torch.Tensor:
    """``[...]`` ``D_f(P_t || P_s)`` per row of logits ``[..., V]`` (float64, differentiable in ``zs``):
    ``sum_v p_s f(p_t / p_s)`` over the entries where both are positive, ``p_s f(0)`` where only
    ``p_t = 0``, ``p_t lim f(r)/r`` where only ``p_s = 0``."""
    f, f0, finf = _distill_generator(fk.get_divergence(name, "distill").name, c)
    pt = torch.softmax(zt.double() / temperature, -1)
    ps = torch.softmax(zs.double() / temperature, -1)
    both = (pt > 0) & (ps > 0)
    r = torch.where(both, pt, 1.0) / torch.where(both, ps, 1.0)
    main = torch.where(both, torch.where(both, ps, 1.0) * f(r), 0.0)
    t0 = (pt == 0) & (ps > 0)
    s0 = (ps == 0) & (pt > 0)
    edge_t = torch.where(t0, ps * f0, 0.0) if math.isfinite(f0) else torch.where(t0, math.inf, 0.0)
    edge_s = torch.where(s0, pt * finf, 0.0) if math.isfinite(finf) else torch.where(s0, math.inf, 0.0)
    return (main + edge_t + edge_s).sum(-1)


def distill_loss(zt, zs, labels, *, divergence="kl", beta=0.5, alpha=None, temperature=1.0, hard_label_weight=0.0,
                 reduction="mean", t2_scaling=False, ignore_index=IGNORE) -> torch.Tensor:
    """``fk.distill_loss``'s value from full teacher / student logits ``[..., T, V]`` (float64):
    ``kappa D + w NLL`` per counted token (``kappa = T^2`` with ``t2_scaling``; NLL of the label
    under the untempered student), reduced by mean / sum over counted tokens or per token."""
    name = fk.get_divergence(divergence, "distill").name
    c = beta if name == "js" else (alpha if name == "alpha" else 0.0)
    mask = labels != ignore_index
    per = distill_divergence(zt, zs, name, c, temperature) * (temperature ** 2 if t2_scaling else 1.0)
    if hard_label_weight:
        nll = torch.logsumexp(zs.double(), -1) - zs.double().gather(-1, torch.where(mask, labels, 0)[..., None]).squeeze(-1)
        per = per + hard_label_weight * nll
    per = torch.where(mask, per, 0.0)
    if reduction == "none":
        return per
    return per.sum() if reduction == "sum" else per.sum() / max(int(mask.sum()), 1)


def mp_generator(name: str, c: float = 0.0):
    """The distillation generator ``f`` in mpmath (js's beta 0 / 1 and alpha's 1 / 0 as their KL limits)."""
    import mpmath as mp

    name = fk.get_divergence(name, "distill").name
    if name == "js" and c in (0.0, 1.0):
        name = "kl" if c == 0.0 else "reverse_kl"
    if name == "alpha" and c == 1.0:
        return lambda r: r * mp.log(r) - r + 1
    if name == "alpha" and c == 0.0:
        return lambda r: r - 1 - mp.log(r)
    return {
        "kl": lambda r: r * mp.log(r),
        "reverse_kl": lambda r: -mp.log(r),
        "js": lambda r: c * r * mp.log(r) - (c * r + 1 - c) * mp.log(c * r + 1 - c),
        "tv": lambda r: abs(r - 1) / 2,
        "squared_hellinger": lambda r: (mp.sqrt(r) - 1) ** 2,
        "pearson": lambda r: (r - 1) ** 2,
        "neyman": lambda r: (1 - r) ** 2 / r,
        "alpha": lambda r: (r ** c - 1 - c * (r - 1)) / (c * (c - 1)),
    }[name]


def distill_mp(zt, zs, *, divergence="kl", beta=0.5, alpha=None, temperature=1.0, dps=60):
    """``(mean over rows of D_f(P_t || P_s), d/d zs [n, V])`` in ``dps``-digit mpmath from finite
    logits ``[n, V]`` (every row counted): probabilities of any range (``e^-10000``) without
    underflow, the gradient by mpmath's numerical differentiation. For the extreme-input tests,
    where float64 probabilities underflow."""
    import mpmath as mp

    name = fk.get_divergence(divergence, "distill").name
    c = beta if name == "js" else (alpha if name == "alpha" else 0.0)
    f = mp_generator(name, c)
    n, v = zs.shape
    with mp.workdps(dps):
        t = mp.mpf(temperature)

        def log_softmax(row):  # row: mpf values (a perturbation of one survives)
            z = [x / t for x in row]
            m = max(z)
            lse = m + mp.log(mp.fsum(mp.exp(x - m) for x in z))
            return [x - lse for x in z]

        def div(lt, zs_row):
            ls = log_softmax(zs_row)
            return mp.fsum(mp.exp(b) * f(mp.exp(a - b)) for a, b in zip(lt, ls))

        total, grad = mp.mpf(0), torch.zeros(n, v, dtype=torch.float64)
        for i in range(n):
            lt = log_softmax([mp.mpf(float(x)) for x in zt[i]])
            row = [mp.mpf(float(x)) for x in zs[i]]
            total += div(lt, row)
            for j in range(v):
                def g(x, j=j):
                    r = list(row)
                    r[j] = x
                    return div(lt, r)
                grad[i, j] = float(mp.diff(g, row[j]) / n)
        return float(total / n), grad


# ---------------------------------------------------------------------------------------------
# Comparing
# ---------------------------------------------------------------------------------------------

def assert_close(actual, expected, *, rtol: float, atol: float, what: str = "") -> None:
    """Elementwise ``|a - e| <= atol * max(1, max|e|) + rtol |e|``: ``atol`` is relative to the
    tensor's largest entry (float32 roundoff scales with it)."""
    assert actual is not None and expected is not None, what
    e = expected.detach().double().cpu()
    scale = max(1.0, float(e.abs().max())) if e.numel() else 1.0
    torch.testing.assert_close(actual.detach().double().cpu(), e, rtol=rtol, atol=atol * scale,
                               msg=lambda m: f"{what}: {m}")
