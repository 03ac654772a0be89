"""One SFT / DPO micro-step against hand-computed full-logits losses (plain torch autograd, float64)."""

import math

import pytest
import torch
import torch.nn.functional as F
from train_batches import TOK
from train_batches import full_logp as _full_logp
from train_batches import pair_batch as _pair_batch
from train_batches import sft_batch as _sft_batch

from fdiv_kernels.train import steps as S
from fdiv_kernels.train.config import DPOConfig, MixDPOConfig, ModelConfig, SFTConfig, TinyModelConfig
from fdiv_kernels.train.modeling import build_tiny_model


def _model(seed):
    torch.manual_seed(seed)
    m = build_tiny_model(ModelConfig(tiny=TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2,
                                                          intermediate_size=64)), TOK)
    return m.double()


def _grads(model):
    g = [p.grad.detach().clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return g


def _assert_grads_close(a, b):
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-9)


def test_sft_nll_step_equals_cross_entropy():
    m, batch = _model(0), _sft_batch()
    cfg = SFTConfig(divergence="sft")
    loss, st = S.sft_micro(m, batch, cfg=cfg, ref_logp=None, norm=S.Norm(S.sft_units(batch, cfg), 1, 1), backend="torch")
    loss.backward()
    g_fused = _grads(m)
    _, mask, logits = _full_logp(m, batch)
    ref = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1), ignore_index=-100)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-9, atol=1e-12)
    _assert_grads_close(g_fused, _grads(m))
    assert st["nll"][0] / st["nll"][1] == pytest.approx(float(ref.detach()), rel=1e-9)
    assert st["tokens"][0] == int(mask.sum())


def test_js_sft_step_with_reference_matches_hand_formula():
    m, ref_m, batch = _model(0), _model(1), _sft_batch()
    cfg = SFTConfig(divergence="js", beta=0.5)
    ref_logp = S.reference_token_logp(ref_m, batch, backend="torch")
    loss, st = S.sft_micro(m, batch, cfg=cfg, ref_logp=ref_logp, norm=S.Norm(S.sft_units(batch, cfg), 1, 1),
                           backend="torch")
    loss.backward()
    g_fused = _grads(m)
    logp, mask, _ = _full_logp(m, batch)
    with torch.no_grad():
        rlogp, _, _ = _full_logp(ref_m, batch)
    u = 0.5 * (logp - rlogp)
    hand = -(math.log(2.0) + F.logsigmoid(u))[mask].mean()  # JS: phi(u) = log 2 + logsigmoid(u)
    hand.backward()
    torch.testing.assert_close(loss, hand, rtol=1e-9, atol=1e-12)
    _assert_grads_close(g_fused, _grads(m))
    assert st["logratio_ref"][0] / st["logratio_ref"][1] == pytest.approx(float((logp - rlogp)[mask].mean().detach()), rel=1e-9)
    # V(s0): lse of the logits at the first supervised position of each row
    _, _, logits = _full_logp(m, batch)
    first = mask.float().argmax(dim=1)
    v0 = torch.logsumexp(logits[torch.arange(len(first)), first], -1).mean()
    assert st["value_s0"][0] / st["value_s0"][1] == pytest.approx(float(v0.detach()), rel=1e-9)


def test_micro_batches_add_up_to_the_full_batch():
    """Gradient accumulation: two halves with the step's global normaliser = the whole batch
    (a sum-decomposable divergence; the log-mean-exp ones: tests/test_train_accumulate.py)."""
    m, ref_m, batch = _model(0), _model(1), _sft_batch(8)
    cfg = SFTConfig(divergence="pearson", beta=0.3)
    ref = S.reference_token_logp(ref_m, batch, backend="torch")
    full, _ = S.sft_micro(m, batch, cfg=cfg, ref_logp=ref, norm=S.Norm(S.sft_units(batch, cfg), 1, 1), backend="torch")
    full.backward()
    g_full = _grads(m)
    halves = [{k: v[s] for k, v in batch.items()} for s in (slice(0, 4), slice(4, 8))]
    norm = S.Norm(S.sft_units(batch, cfg), 2, 1, S.sft_counts(batch))
    total = 0.0
    for h, r in zip(halves, (ref[:4], ref[4:])):
        loss, _ = S.sft_micro(m, h, cfg=cfg, ref_logp=r, norm=norm, backend="torch")
        loss.backward()
        total += float(loss.detach())
    assert S.sft_decomposable(cfg)
    assert total == pytest.approx(float(full.detach()), rel=1e-9)
    _assert_grads_close(_grads(m), g_full)


@pytest.mark.parametrize("kind,beta,gamma", [("sigmoid", 0.1, 0.0), ("ipo", 0.5, 0.0), ("simpo", 2.0, 1.0)])
def test_dpo_step_matches_hand_formula(kind, beta, gamma):
    m, ref_m, batch = _model(0), _model(1), _pair_batch(4)
    cfg = DPOConfig(loss_type=kind, beta=beta, gamma=gamma)
    ref = S.reference_pair_logps(ref_m, batch, spec=cfg.spec, backend="torch") if kind != "simpo" else None
    loss, st = S.dpo_micro(m, batch, cfg=cfg, ref=ref, norm=S.Norm(4, 1, 1), backend="torch")
    loss.backward()
    g_fused = _grads(m)

    logp, mask, _ = _full_logp(m, batch)
    with torch.no_grad():
        rlogp, _, _ = _full_logp(ref_m, batch)
    n = mask.sum(1)
    seq, rseq = logp.sum(1), rlogp.sum(1)
    if kind in ("ipo", "simpo"):  # length-averaged log-probs
        seq, rseq = seq / n, rseq / n
    pc, pr, rc, rr = seq[:4], seq[4:], rseq[:4], rseq[4:]
    if kind == "sigmoid":
        hand = -F.logsigmoid(beta * ((pc - pr) - (rc - rr))).mean()
    elif kind == "ipo":
        hand = (((pc - pr) - (rc - rr)) - 1 / (2 * beta)).pow(2).mean()
    else:
        hand = -F.logsigmoid(beta * (pc - pr) - gamma).mean()
    hand.backward()
    torch.testing.assert_close(loss, hand, rtol=1e-9, atol=1e-12)
    _assert_grads_close(g_fused, _grads(m))
    rew_c = beta * (pc - rc) if kind != "simpo" else beta * pc
    rew_r = beta * (pr - rr) if kind != "simpo" else beta * pr
    assert st["accuracy"][0] / st["accuracy"][1] == pytest.approx(float((rew_c > rew_r).float().mean().detach()))


def test_dpo_sft_weight_adds_chosen_nll():
    m, ref_m, batch = _model(0), _model(1), _pair_batch(4)
    ref = S.reference_pair_logps(ref_m, batch, spec=DPOConfig().spec, backend="torch")
    base, _ = S.dpo_micro(m, batch, cfg=DPOConfig(beta=0.1), ref=ref, norm=S.Norm(4, 1, 1), backend="torch")
    with_nll, _ = S.dpo_micro(m, batch, cfg=DPOConfig(beta=0.1, sft_weight=0.5), ref=ref, norm=S.Norm(4, 1, 1),
                              backend="torch")
    logp, mask, _ = _full_logp(m, batch)
    nll_chosen = -logp[:4].sum() / mask[:4].sum()
    assert float((with_nll - base).detach()) == pytest.approx(0.5 * float(nll_chosen.detach()), rel=1e-9)


def test_dpo_loss_type_list_with_weights():
    """``dpo.loss_type`` as TRL's list with ``dpo.loss_weights`` (YAML or code), ``sft_weight`` as the
    spec's sft term; ``dpo_micro``'s loss is the weighted sum of the types' fk.dpo_loss plus the NLL."""
    from fdiv_kernels.api import dpo_loss
    from fdiv_kernels.errors import ConfigError
    from fdiv_kernels.train.config import from_dict

    cfg = from_dict({"dpo": {"loss_type": ["sigmoid", "bco_pair"], "loss_weights": [0.8, "2e-1"], "sft_weight": 0.5,
                             "beta": 0.2}}).dpo
    spec = cfg.spec
    assert spec.components == (("sigmoid", 0.8), ("bco_pair", 0.2), ("sft", 0.5))
    assert from_dict({"dpo": {"loss_type": "ipo"}}).dpo.spec.loss_type == "ipo"
    with pytest.raises(ConfigError, match="must be a list"):
        from_dict({"dpo": {"loss_weights": 0.5}})
    with pytest.raises(ValueError, match="is dpo.sft_weight in the trainer"):
        DPOConfig(loss_type=["sigmoid", "sft"]).spec
    m, ref_m, batch = _model(0), _model(1), _pair_batch(4)
    ref = S.reference_pair_logps(ref_m, batch, spec=spec, backend="torch")
    loss, st = S.dpo_micro(m, batch, cfg=cfg, ref=ref, norm=S.Norm(4, 1, 1), backend="torch")
    logp, mask, _ = _full_logp(m, batch)
    s = (logp * mask).sum(1)
    want = dpo_loss(s[:4], s[4:], ref[:4], ref[4:], beta=0.2, loss_type=["sigmoid", "bco_pair", "sft"],
                    loss_weights=[0.8, 0.2, 0.5], chosen_tokens=mask[:4].sum(1))
    assert float(loss.detach()) == pytest.approx(float(want.loss.detach()), rel=1e-9)
    assert st["dpo_loss"][0] / 4 == pytest.approx(float((want.losses - 0.5 * want.nll).detach().mean()), rel=1e-9)


def test_mix_dpo_lambda_halves_and_doubles():
    cfg = MixDPOConfig(target_accuracy=0.6, lambda_min=0.25, lambda_max=4.0)
    assert S.adapt_lambda(1.0, 0.9, cfg) == 0.5
    assert S.adapt_lambda(1.0, 0.1, cfg) == 2.0
    assert S.adapt_lambda(0.25, 0.9, cfg) == 0.25 and S.adapt_lambda(4.0, 0.0, cfg) == 4.0


def test_training_steps_never_form_full_logits():
    """SFT / DPO / pretraining micro-steps use the fused primitive: the LM head module is never called."""
    m, ref_m = _model(0), _model(1)

    def boom(*a, **k):
        raise AssertionError("lm_head called: full [B, T, V] logits formed")

    m.lm_head.forward = boom
    ref_m.lm_head.forward = boom
    sft_b, pair_b = _sft_batch(), _pair_batch()
    ref = S.reference_token_logp(ref_m, sft_b, backend="torch")
    loss, _ = S.sft_micro(m, sft_b, cfg=SFTConfig(divergence="js"), ref_logp=ref, norm=S.Norm(10, 1, 1), backend="torch")
    loss.backward()
    pref = S.reference_pair_logps(ref_m, pair_b, spec=DPOConfig().spec, backend="torch")
    loss, _ = S.dpo_micro(m, pair_b, cfg=DPOConfig(), ref=pref, norm=S.Norm(4, 1, 1), backend="torch")
    loss.backward()
    loss, _ = S.pretrain_micro(m, sft_b, norm=S.Norm(10, 1, 1), backend="torch")
    loss.backward()
    assert m.lm_head.weight.grad is not None and float(m.lm_head.weight.grad.abs().sum()) > 0
    assert all(p.grad is None for p in ref_m.parameters())  # reference log-probs under no_grad
