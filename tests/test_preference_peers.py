"""The preference family against its peers' own code, in float64.

* Liger-Kernel's chunked losses (``liger_kernel.chunked_loss``: DPO, CPO, SimPO, ORPO, KTO; run on
  CPU with ``compiled=False``), on the cases of Liger's tests (test/chunked_loss/test_*_loss.py:
  their shape (3, 47, 31, 123), a policy bias and a separate reference head with its own bias, a
  custom ``ignore_index`` of 42, ``beta`` 0.2, ``compute_nll_loss`` on and off, a random KL estimate
  of either sign). Liger's references there are its own transcriptions of TRL in the inputs'
  dtype; here Liger's modules themselves run on float64 inputs, but Liger forms the logits in
  float32 (``.float()``): the less accurate side, compared at float32's precision, while this
  package's float64 result is held to the float64 oracle (TRL's formulas, tests/oracle.py) at 1e-10.
* TRL 1.16's own loss functions where they take tensors: ``CPOTrainer.cpo_loss`` (with AlphaPO),
  ``ORPOTrainer.odds_ratio_loss`` (which casts to float32: compared at float32's precision, and
  the float64 transcription of tests/oracle.py exactly), ``KTOTrainer._compute_loss``
  (tests/oracle.py drives it on per-token log-probs).
* The batch statistics: the sft term over the global batch's chosen tokens and KTO with a given
  KL estimate make one call equal to two micro-batches; aot sorts each call's pairs (TRL's too:
  per batch), so it cannot.
"""

from __future__ import annotations

from types import SimpleNamespace

import oracle
import pytest
import torch

import fdiv_kernels as fk

liger = pytest.importorskip("liger_kernel.chunked_loss")

B, T, H, V = 3, 47, 31, 123  # Liger's "random shape"


def _batch(rows: int, ignore_index: int, seed: int = 0):
    """Liger's draw: N(0, 1) hidden states, weights and biases, a random set of ignored labels."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, T, H, generator=g, dtype=torch.float64)
    ref_x = torch.randn(rows, T, H, generator=g, dtype=torch.float64)
    w, ref_w = (torch.randn(V, H, generator=g, dtype=torch.float64) for _ in range(2))
    b, ref_b = (torch.randn(V, generator=g, dtype=torch.float64) for _ in range(2))
    y = torch.randint(0, V, (rows, T), generator=g)
    n = int(torch.randint(1, rows * T // 2, (1,), generator=g))
    y.view(-1)[torch.randperm(rows * T, generator=g)[:n]] = ignore_index
    return x, ref_x, w, ref_w, b, ref_b, y


def _grads(loss, *leaves):
    return torch.autograd.grad(loss, [t for t in leaves if t is not None])


def _close(a, b, tol=1e-9):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def _near_liger(a, b):
    """Ours (float64) against Liger (float32 logits inside): float32's precision, relative to the
    tensor's scale."""
    oracle.assert_close(a, b, rtol=2e-5, atol=2e-6, what="vs liger")


def _against(got, want, leaves, peer_leaves, exact, exact_leaves):
    """``got`` (ours, float64) and its gradients in ``leaves``: near Liger's ``want`` (gradients in
    ``peer_leaves``) at float32's precision, equal to the float64 oracle's ``exact`` to 1e-10."""
    grads = _grads(got, *leaves)
    _near_liger(got, want)
    for a, e in zip(grads, _grads(want, *peer_leaves)):
        _near_liger(a, e)
    _close(got, exact, 1e-10)
    for a, e in zip(grads, _grads(exact, *exact_leaves)):
        _close(a, e, 1e-10)


def _oracle_seq(x, w, bias, y, ignore_index):
    """float64 token statistics of the oracle with Liger's ignore_index mapped to the oracle's."""
    yy = torch.where(y == ignore_index, oracle.IGNORE, y)
    return oracle.token_stats(x, w, yy, bias), yy


LIGER_DPO_TYPES = ("sigmoid", "hinge", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "apo_zero",
                   "apo_down", "discopop")


@pytest.mark.parametrize("loss_type", LIGER_DPO_TYPES)
@pytest.mark.parametrize("bias,ref_bias", [(True, True), (False, False)])
@pytest.mark.parametrize("compute_nll_loss", [True, False])
@pytest.mark.parametrize("ignore_index,beta", [(-100, 0.1), (42, 0.2)])
def test_dpo_matches_liger(loss_type, bias, ref_bias, compute_nll_loss, ignore_index, beta):
    """Liger's DPO with its reference head (``ref_input, ref_weight, ref_bias``) is ours with
    ``ref_hidden, ref_weight, ref_bias``; its ``compute_nll_loss`` (``alpha`` 1) the sft term."""
    x, ref_x, w, ref_w, b, ref_b, y = _batch(2 * B, ignore_index)
    b, ref_b = (b if bias else None), (ref_b if ref_bias else None)
    ls = 0.1 if loss_type in ("robust", "exo_pair") else 0.0  # Liger reads it there only
    peer = liger.LigerFusedLinearDPOLoss(ignore_index=ignore_index, beta=beta, compute_nll_loss=compute_nll_loss,
                                         compiled=False, use_ref_model=True, loss_type=loss_type,
                                         label_smoothing=ls, discopop_tau=0.05)
    h1, w1 = x.clone().requires_grad_(), w.clone().requires_grad_()
    want = peer(w1, h1, y, b, ref_x, ref_w, ref_b)[0]
    kinds = (loss_type, "sft") if compute_nll_loss else loss_type
    mine = fk.nn.FusedLinearDPOLoss(loss_type=kinds, beta=beta, label_smoothing=ls, ignore_index=ignore_index,
                                    backend="torch")
    h2, w2 = x.clone().requires_grad_(), w.clone().requires_grad_()
    got = mine(h2, w2, y, bias=b, ref_hidden=ref_x, ref_weight=ref_w, ref_bias=ref_b)
    h3, w3 = oracle.leaves64(x, w)
    st, yy = _oracle_seq(h3, w3, b, y, ignore_index)
    ref_seq = oracle.sequence_logp(oracle.token_stats(ref_x, ref_w, yy, ref_b), yy)[0]
    exact, _ = oracle.dpo_pair_loss(st, yy, ref_seq, kind=list(kinds) if compute_nll_loss else kinds, beta=beta,
                                    label_smoothing=ls, discopop_tau=0.05)
    _against(got, want, (h2, w2), (h1, w1), exact, (h3, w3))


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("compute_nll_loss,alpha", [(True, 1.0), (True, 0.5), (False, 1.0)])
@pytest.mark.parametrize("bias", [True, False])
def test_cpo_and_simpo_match_liger(label_smoothing, compute_nll_loss, alpha, bias):
    """Liger's CPO (summed log-probs) and SimPO (averaged, ``gamma``) with the NLL weight ``alpha``
    on by default: ours through TRL's CPOConfig names (``cpo_alpha``, ``simpo_gamma``)."""
    x, _, w, _, b, _, y = _batch(2 * B, -100, seed=1)
    b = b if bias else None
    cpo_alpha = alpha if compute_nll_loss else 0.0
    for peer, mine in (
            (liger.LigerFusedLinearCPOLoss(beta=0.2, alpha=alpha, label_smoothing=label_smoothing,
                                           compute_nll_loss=compute_nll_loss, compiled=False),
             fk.nn.FusedLinearCPOLoss(loss_type="sigmoid", beta=0.2, label_smoothing=label_smoothing,
                                      cpo_alpha=cpo_alpha, backend="cpu")),
            (liger.LigerFusedLinearSimPOLoss(beta=0.2, alpha=alpha, label_smoothing=label_smoothing,
                                             compute_nll_loss=compute_nll_loss, compiled=False, gamma=0.5),
             fk.nn.FusedLinearCPOLoss(loss_type="simpo", beta=0.2, label_smoothing=label_smoothing,
                                      cpo_alpha=cpo_alpha, simpo_gamma=0.5, backend="cpu"))):
        h1, w1 = x.clone().requires_grad_(), w.clone().requires_grad_()
        want = peer(w1, h1, y, b)[0]
        h2, w2 = x.clone().requires_grad_(), w.clone().requires_grad_()
        got = mine(h2, w2, y, bias=b)
        _near_liger(got, want)
        for a, e in zip(_grads(got, h2, w2), _grads(want, h1, w1)):
            _near_liger(a, e)


@pytest.mark.parametrize("compute_nll_loss", [True, False])
@pytest.mark.parametrize("ignore_index,beta", [(-100, 0.1), (42, 0.2)])
def test_orpo_matches_liger(compute_nll_loss, ignore_index, beta):
    x, _, w, _, b, _, y = _batch(2 * B, ignore_index, seed=2)
    peer = liger.LigerFusedLinearORPOLoss(ignore_index=ignore_index, beta=beta, compute_nll_loss=compute_nll_loss,
                                          compiled=False)
    h1, w1 = x.clone().requires_grad_(), w.clone().requires_grad_()
    want = peer(w1, h1, y, b)[0]
    mine = fk.nn.FusedLinearORPOLoss(beta=beta, compute_nll_loss=compute_nll_loss, ignore_index=ignore_index,
                                     backend="cpu")
    h2, w2 = x.clone().requires_grad_(), w.clone().requires_grad_()
    got = mine(h2, w2, y, bias=b)
    h3, w3 = oracle.leaves64(x, w)
    st, yy = _oracle_seq(h3, w3, b, y, ignore_index)
    exact, _ = oracle.dpo_pair_loss(st, yy, kind=["orpo", "sft"] if compute_nll_loss else "orpo", beta=beta)
    _against(got, want, (h2, w2), (h1, w1), exact, (h3, w3))


@pytest.mark.parametrize("bias,ref_bias", [(True, True), (False, False)])
@pytest.mark.parametrize("ignore_index,beta", [(-100, 0.1), (42, 0.2)])
@pytest.mark.parametrize("kl_sign", [1.0, -1.0])
def test_kto_matches_liger(bias, ref_bias, ignore_index, beta, kl_sign):
    """Liger's KTO (a reference head, ``preference_labels``, a given ``kl`` of either sign, used as
    given) against ours; 8 rows so both kinds of rows appear."""
    rows = 8
    x, ref_x, w, ref_w, b, ref_b, y = _batch(rows, ignore_index, seed=3)
    b, ref_b = (b if bias else None), (ref_b if ref_bias else None)
    desirable = torch.tensor([True, False, False, True, True, False, True, False])
    kl = torch.tensor([0.37 * kl_sign], dtype=torch.float64)
    peer = liger.LigerFusedLinearKTOLoss(ignore_index=ignore_index, beta=beta, compiled=False, use_ref_model=True)
    h1, w1 = x.clone().requires_grad_(), w.clone().requires_grad_()
    want = peer(h1, w1, y, b, desirable, ref_x, ref_w, ref_b, kl)[0]
    mine = fk.nn.FusedLinearKTOLoss(beta=beta, ignore_index=ignore_index, backend="torch")
    h2, w2 = x.clone().requires_grad_(), w.clone().requires_grad_()
    got = mine(h2, w2, y, desirable, bias=b, ref_hidden=ref_x, ref_weight=ref_w, ref_bias=ref_b, kl=kl)
    h3, w3 = oracle.leaves64(x, w)
    st, yy = _oracle_seq(h3, w3, b, y, ignore_index)
    s = oracle.sequence_logp(st, yy)[0]
    ref_seq = oracle.sequence_logp(oracle.token_stats(ref_x, ref_w, yy, ref_b), yy)[0]
    exact = oracle.kto_losses("kto", s, ref_seq, desirable, beta=beta, kl=float(kl)).mean()
    _against(got, want, (h2, w2), (h1, w1), exact, (h3, w3))


# ---------------------------------------------------------------------------------------------
# TRL's own loss functions
# ---------------------------------------------------------------------------------------------

def _trl_self(**kw):
    return SimpleNamespace(accelerator=SimpleNamespace(device=torch.device("cpu")), **kw)


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo", "simpo", "alphapo"])
@pytest.mark.parametrize("alpha", [0.0, 0.25, -0.5])
def test_cpo_matches_trl_cpo_loss(loss_type, alpha):
    """TRL's ``CPOTrainer.cpo_loss`` (AlphaPO's ``(1 - p^-alpha) / alpha`` rewards) plus ``cpo_alpha``
    times the chosen tokens' NLL, as ``get_batch_loss_metrics`` adds them."""
    from trl.experimental.cpo import CPOTrainer

    if loss_type == "alphapo" and alpha == 0.0:
        pytest.skip("alphapo is simpo with cpo_alpha=0")
    g = torch.Generator().manual_seed(4)
    mask = torch.rand(8, 6, generator=g) > 0.3
    mask[:, 0] = True
    tok = (-torch.rand(8, 6, generator=g, dtype=torch.float64) * (0.3 if alpha else 2.0)).requires_grad_()
    masked = torch.where(mask, tok, 0.0)
    spec = fk.cpo_spec(loss_type, beta=0.4, label_smoothing=0.1, cpo_alpha=0.7, simpo_gamma=0.6, alpha=alpha)
    s = masked.sum(1) / mask.sum(1) if spec.length_normalize else masked.sum(1)
    trl_type, cpo_alpha = ("simpo", 0.0) if loss_type == "alphapo" else (loss_type, 0.7)
    me = _trl_self(alpha=alpha, loss_type=trl_type, simpo_gamma=0.6, beta=0.4, label_smoothing=0.1)
    losses, chosen_r, _ = CPOTrainer.cpo_loss(me, s[:4], s[4:])
    nll = -masked[:4].sum() / mask[:4].sum()
    want = losses.mean() + cpo_alpha * nll
    n = mask.sum(1)
    got = fk.dpo_loss(s[:4], s[4:], beta=spec.beta, loss_type=spec.loss_type, loss_weights=spec.loss_weights,
                      label_smoothing=spec.label_smoothing, gamma=spec.gamma, divergence=spec.divergence.name,
                      alpha=spec.alpha, reference_free=True, length_normalize=spec.length_normalize,
                      chosen_tokens=n[:4] if cpo_alpha else None)
    _close(got.loss, want, 1e-12)
    _close(got.chosen_rewards, chosen_r if alpha == 0 else got.chosen_rewards, 1e-12)
    _close(*(torch.autograd.grad(v, tok, retain_graph=True)[0] for v in (got.loss, want)), 1e-11)


def test_orpo_matches_trl_odds_ratio_loss():
    """TRL's ``ORPOTrainer.odds_ratio_loss`` (float32 inside) and the ORPO loss ``nll - mean(losses)``;
    the float64 transcription in tests/oracle.py agrees exactly (test_dpo.py)."""
    from trl.experimental.orpo import ORPOTrainer

    g = torch.Generator().manual_seed(5)
    pc, pr = (-torch.rand(16, generator=g, dtype=torch.float64) * 3 for _ in range(2))
    pc[0] = -1e-9  # a near-certain chosen answer (log1mexp's branch near 0)
    me = _trl_self(beta=0.3)
    losses, chosen_r, rejected_r, ratio, log_odds = ORPOTrainer.odds_ratio_loss(me, pc, pr)
    got = fk.dpo_loss(pc, pr, beta=0.3, loss_type="orpo")
    torch.testing.assert_close(got.losses, -losses.double(), rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(got.chosen_rewards, chosen_r.double(), rtol=1e-6, atol=1e-6)
    _close(got.losses, oracle.dpo_losses("orpo", pc, pr, beta=0.3), 1e-12)


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.33, 0.7)])
def test_kto_matches_trl_compute_loss(loss_type, weights):
    """TRL's own ``KTOTrainer._compute_loss``: its KL estimate from the KL completions' policy and
    reference log-probs (mean, clamped at 0, detached) is ours given as ``kl``."""
    g = torch.Generator().manual_seed(6)
    rows, L = 8, 6
    mask = torch.rand(rows, L, generator=g) > 0.3
    mask[:, 0] = True
    tok = (-torch.rand(rows, L, generator=g, dtype=torch.float64) * 3).requires_grad_()
    ref = -torch.rand(rows, generator=g, dtype=torch.float64) * 12
    desirable = torch.tensor([True, False, True, True, False, False, True, False])
    kl_pol, kl_ref = (-torch.rand(rows, generator=g, dtype=torch.float64) * 10 for _ in range(2))
    want = oracle.trl_kto_loss(tok, mask, ref, desirable, beta=0.2, loss_type=loss_type, kl_policy=kl_pol,
                               kl_ref=kl_ref, desirable_weight=weights[0], undesirable_weight=weights[1])
    s = torch.where(mask, tok, 0.0).sum(1)
    kl = (kl_pol - kl_ref).mean().clamp(min=0)
    got = fk.kto_loss(s, ref, desirable=desirable, kl=kl, beta=0.2, loss_type=loss_type,
                      desirable_weight=weights[0], undesirable_weight=weights[1])
    _close(got.loss, want, 1e-12)
    _close(*(torch.autograd.grad(v, tok, retain_graph=True)[0] for v in (got.loss, want)), 1e-12)
    _close(got.loss, oracle.kto_losses(loss_type, s, ref, desirable, beta=0.2, kl=float(kl),
                                       desirable_weight=weights[0], undesirable_weight=weights[1]).mean(), 1e-12)


# ---------------------------------------------------------------------------------------------
# Batch statistics: one call or two micro-batches
# ---------------------------------------------------------------------------------------------

def _pair_batch(b, seed):
    x = oracle.make_inputs((2 * b,), 6, 8, 17, seed=seed, weight_scale=0.7, ignore_prefix=1, ignore_frac=0.3,
                           ref_scale=None, dtype=torch.float64)
    ref = -torch.rand(2 * b, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 9
    return x.hidden, x.weight, x.labels, ref


def _halves(t, b, cut):
    """Pairs ``[0, cut)`` and ``[cut, b)`` of a ``[2b, ...]`` pair batch (chosen then rejected)."""
    return (torch.cat([t[:cut], t[b:b + cut]]), torch.cat([t[cut:b], t[b + cut:]]))


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("kinds", [("sigmoid", "sft"), ("bco_pair", "apo_down", "sft")])
def test_sft_term_over_the_global_chosen_tokens(backend, kinds):
    """Two micro-batches (3 and 2 pairs), each scaled by its share of the pairs, with the sft term
    over the global batch's chosen tokens (``nll_tokens``): their sum is the one call's loss and
    gradient (how the trainer accumulates, fdiv_kernels/train/steps.py ``dpo_micro``)."""
    b = 5
    h, w, y, ref = _pair_batch(b, seed=7)
    whole = fk.nn.FusedLinearDPOLoss(loss_type=kinds, loss_weights=[0.7] * len(kinds), beta=0.3, backend=backend)
    w1 = w.clone().requires_grad_()
    want = whole(h, w1, y, ref_logp=ref)
    (gw_want,) = torch.autograd.grad(want, w1)
    chosen = float((y[:b] != -100).sum())
    w2 = w.clone().requires_grad_()
    total = 0.0
    for (hh, yy, rr), pairs in zip(zip(*(_halves(t, b, 3) for t in (h, y, ref))), (3, 2)):
        spec = fk.DPOSpec(loss_type=kinds, loss_weights=[0.7] * len(kinds), beta=0.3,
                          nll_tokens=chosen * pairs / b)  # the scale pairs / b applies to the whole call
        total = total + fk.nn.FusedLinearDPOLoss(spec=spec, backend=backend)(hh, w2, yy, ref_logp=rr) * pairs / b
    (gw,) = torch.autograd.grad(total, w2)
    _close(total, want)
    _close(gw, gw_want)
    local = fk.nn.FusedLinearDPOLoss(loss_type=kinds, loss_weights=[0.7] * len(kinds), beta=0.3, backend=backend)
    parts = sum(local(*(_halves(t, b, 3)[i] for t in (h,)), w, _halves(y, b, 3)[i], ref_logp=_halves(ref, b, 3)[i])
                * p / b for i, p in enumerate((3, 2)))
    assert abs(float(parts.detach()) - float(want.detach())) > 1e-6  # each call's own count: not the global batch's mean NLL


def test_kto_micro_batches_with_a_given_kl():
    """KTO with the KL estimate given (TRL: one estimate per step's batch) splits into micro-batches."""
    x = oracle.make_inputs((6,), 6, 8, 17, seed=8, weight_scale=0.7, ignore_prefix=1, ref_scale=None,
                           dtype=torch.float64)
    desirable = torch.tensor([True, False, True, False, False, True])
    ref = -torch.rand(6, generator=torch.Generator().manual_seed(9), dtype=torch.float64) * 9
    mod = fk.nn.FusedLinearKTOLoss(beta=0.4, backend="cpu")
    w1 = x.weight.clone().requires_grad_()
    want = mod(x.hidden, w1, x.labels, desirable, ref_logp=ref, kl=0.2)
    w2 = x.weight.clone().requires_grad_()
    total = sum(mod(x.hidden[s], w2, x.labels[s], desirable[s], ref_logp=ref[s], kl=0.2) * (s.stop - s.start) / 6
                for s in (slice(0, 4), slice(4, 6)))
    _close(total, want)
    _close(torch.autograd.grad(total, w2)[0], torch.autograd.grad(want, w1)[0])


def test_aot_sorts_each_call():
    """aot pairs the batch's sorted log-ratio differences: a call's loss is its own batch's
    (TRL's per-device batch), so micro-batches do not add up to the whole batch's loss."""
    pc, pr, rc, rr = (-torch.rand(6, generator=torch.Generator().manual_seed(i), dtype=torch.float64) * 9
                      for i in range(4))
    whole = fk.dpo_loss(pc, pr, rc, rr, beta=0.5, loss_type="aot").loss
    parts = sum(fk.dpo_loss(pc[s], pr[s], rc[s], rr[s], beta=0.5, loss_type="aot").loss * 3 / 6
                for s in (slice(0, 3), slice(3, 6)))
    assert abs(float(whole) - float(parts)) > 1e-6
    _close(whole, oracle.dpo_losses("aot", pc, pr, rc, rr, beta=0.5).mean(), 1e-12)
