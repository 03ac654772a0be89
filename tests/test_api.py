"""The public vocabulary (issue 17 items 1, 2, 4, 6; issue 18's ``shift=``): one spec per module,
one divergence registry, the DPO loss-type table and ``loss_type``, ``token_stats`` unpacking as
``(logp, lse)``, ``fk.loss(shift=True)``; every former spelling still works, gives the same
numbers and warns."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import fdiv_kernels as fk
from fdiv_kernels import hf
from fdiv_kernels import DPO_LOSS_TYPES, TRL_F_DIVERGENCES
from fdiv_kernels.nn import FDivLoss, FusedLinearDPOLoss, FusedLinearFDivLoss
from fdiv_kernels.specs import DPOSpec, FDivSpec, HeadSpec, PrimalSpec

V, H, T = 13, 6, 7


def data(seed=0, rows=4, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, T, H, generator=g, dtype=dtype)
    weight = torch.randn(V, H, generator=g, dtype=dtype) * 0.5
    labels = torch.randint(0, V, (rows, T), generator=g)
    labels[:, :2] = -100
    labels[1, -1] = -100
    return hidden, weight, labels


def grads(fn, *xs):
    xs = [x.detach().clone().requires_grad_() for x in xs]
    out = fn(*xs)
    return out, torch.autograd.grad(out, xs)


def ref_logp64(hidden, weight, labels):
    """float64 ``log softmax(h W^T)[y]`` by plain autograd (0 where ignored)."""
    lp = torch.log_softmax(hidden.double() @ weight.double().T, -1)
    lp = lp.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    return torch.where(labels != -100, lp, torch.zeros_like(lp))


# ------------------------------------------------------------------------------------------
# token_stats: (logp, lse), or three with return_entropy=True
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("api", ["fused", "logits"])
def test_token_stats_unpacks_as_two_and_three_with_entropy(api):
    hidden, weight, labels = data()
    z = hidden @ weight.T
    call = ((lambda **kw: fk.token_stats(hidden, weight, labels, backend="torch", **kw)) if api == "fused" else
            (lambda **kw: fk.token_stats_from_logits(z, labels, **kw)))
    logp, lse = call()
    torch.testing.assert_close(logp, ref_logp64(hidden, weight, labels))
    m = labels != -100
    torch.testing.assert_close(lse[m], torch.logsumexp(z, -1)[m])
    two = call()
    assert isinstance(two, fk.LogpLse) and len(two) == 2 and two.entropy is None and two.logp is two[0]
    logp3, lse3, ent = call(return_entropy=True)
    p = torch.softmax(z, -1)
    torch.testing.assert_close(ent[m], -(p * torch.log(p)).sum(-1)[m])
    three = call(return_entropy=True)
    assert isinstance(three, fk.TokenStats) and len(three) == 3 and three.entropy is three[2]
    assert torch.equal(logp3, logp) and torch.equal(lse3, lse)


# ------------------------------------------------------------------------------------------
# fk.loss(shift=True): the HF causal-LM shift inside
# ------------------------------------------------------------------------------------------

SHIFT_CASES = [{"divergence": "sft"}, {"divergence": "js", "beta": 0.5, "ref": "token"},
               {"divergence": "kl", "level": "sequence", "beta": 0.3, "ref": "row"},
               {"divergence": "pearson", "level": "sequence", "values": "detach", "ref": "token_shifted"}]


@pytest.mark.parametrize("api", ["fused", "logits"])
@pytest.mark.parametrize("case", SHIFT_CASES, ids=lambda c: "-".join(map(str, c.values())))
def test_loss_shift_equals_manual_shift_values_and_gradients(api, case):
    hidden, weight, labels = data(seed=1)
    kw = dict(case)
    ref_kind = kw.pop("ref", None)
    g = torch.Generator().manual_seed(2)
    ref = {None: None, "token": -torch.rand(4, T, generator=g, dtype=torch.float64) * 3,
           "token_shifted": -torch.rand(4, T - 1, generator=g, dtype=torch.float64) * 3,
           "row": -torch.rand(4, generator=g, dtype=torch.float64) * 10}[ref_kind]
    ref_manual = ref[..., 1:] if ref_kind == "token" else ref

    def shifted(h, w):
        if api == "fused":
            return fk.loss(h, w, labels, ref_logp=ref, shift=True, backend="torch", **kw).loss
        return fk.loss(logits=h @ w.T, labels=labels, ref_logp=ref, shift=True, **kw).loss

    def manual(h, w):
        if api == "fused":
            return fk.loss(h[:, :-1], w, labels[:, 1:], ref_logp=ref_manual, backend="torch", **kw).loss
        return fk.loss(logits=(h @ w.T)[:, :-1], labels=labels[:, 1:], ref_logp=ref_manual, **kw).loss

    a, ga = grads(shifted, hidden, weight)
    b, gb = grads(manual, hidden, weight)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    for x, y in zip(ga, gb, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)
    assert ga[0][:, -1].abs().max() == 0  # the last position predicts nothing


def test_loss_shift_is_hf_cross_entropy_in_float64():
    """``shift=True`` with unshifted ``labels = input_ids`` is HF's causal-LM loss."""
    hidden, weight, labels = data(seed=3)
    out = fk.loss(hidden, weight, labels, shift=True, backend="torch")
    z = (hidden @ weight.T)[:, :-1].reshape(-1, V)
    torch.testing.assert_close(out.loss, F.cross_entropy(z, labels[:, 1:].reshape(-1)), rtol=1e-12, atol=1e-12)
    assert out.logp.shape == (4, T - 1)


def test_primal_loss_shift_and_nn_shift_share_the_helper():
    hidden, weight, labels = data(seed=4)
    a = fk.primal_loss(hidden, weight, labels, divergence="tv", shift=True, backend="torch").loss
    b = fk.primal_loss(hidden[:, :-1], weight, labels[:, 1:], divergence="tv", backend="torch").loss
    c = FusedLinearFDivLoss(spec=PrimalSpec("tv"), shift_labels=True, backend="torch")(hidden, weight, labels)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-12)
    assert fk.nn.shift_for_causal_lm is fk.api.shift_for_causal_lm
    with pytest.raises(ValueError, match="labels must have shape"):
        fk.loss(hidden, weight, labels[:, :-1], shift=True)


# ------------------------------------------------------------------------------------------
# fk.primal_loss; fk.loss(form="primal") deprecated
# ------------------------------------------------------------------------------------------

PRIMAL_F64 = {  # D_f(onehot(y) || p) of l = log p_y, float64 (primal.py's table)
    "kl": lambda lp, a: -lp,
    "tv": lambda lp, a: 1 - lp.exp(),
    "pearson": lambda lp, a: 1 / lp.exp() - 1,
    "squared_hellinger": lambda lp, a: 2 * (1 - (lp / 2).exp()),
    "js": lambda lp, a: lp.exp() * lp - (1 + lp.exp()) * torch.log1p(lp.exp()) + 2 * math.log(2),
    "alpha": lambda lp, a: ((1 - a) * lp).exp().sub(1) / (a * (a - 1)),
}


@pytest.mark.parametrize("name", sorted(PRIMAL_F64))
def test_primal_loss_values_and_gradients_against_float64(name):
    hidden, weight, labels = data(seed=5)
    m = labels != -100

    def want(h, w):
        return PRIMAL_F64[name](ref_logp64(h, w, labels)[m], 0.7).mean()

    a, ga = grads(lambda h, w: fk.primal_loss(h, w, labels, divergence=name, alpha=0.7, backend="torch").loss,
                  hidden, weight)
    b, gb = grads(want, hidden, weight)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    for x, y in zip(ga, gb, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("call", [
    lambda h, w, y: fk.loss(h, w, y, divergence="alpha", form="primal", alpha=1.5),
    lambda h, w, y: fk.dpo_loss(y[0].float(), y[0].float(), y[0].float(), y[0].float(), beta=0.1, kind="ipo"),
    lambda h, w, y: fk.dpo_loss(y[0].float(), y[0].float(), y[0].float(), y[0].float(), beta=0.1,
                                f_divergence="forward_kl"),
    lambda h, w, y: DPOSpec(kind="ipo"),
    lambda h, w, y: FusedLinearDPOLoss(f_alpha=2.0, divergence="alpha"),
    lambda h, w, y: FDivLoss(divergence="pearson", form="primal"),
])
def test_former_names_are_gone(call):
    """0.x renames leave no alias (CHANGELOG lists them): a former keyword is a TypeError."""
    hidden, weight, labels = data(seed=6)
    with pytest.raises(TypeError, match="unexpected keyword|unknown loss option"):
        call(hidden, weight, labels)


# ------------------------------------------------------------------------------------------
# one registry: one name = one divergence, each API says which names it supports
# ------------------------------------------------------------------------------------------

def test_registry_says_what_each_entry_supports():
    reg = fk.DIVERGENCE_REGISTRY
    assert set(fk.DIVERGENCES) == {n for n, d in reg.items() if "variational" in d.supports}
    assert set(fk.PRIMAL_DIVERGENCES) == set(fk.formulas.primal.PRIMAL_LOSSES) == set(fk.divergence_names("primal"))
    assert set(fk.DPO_DIVERGENCES) == {"kl", "reverse_kl", "js", "alpha"}
    assert set(fk.DISTILL_DIVERGENCES) == set(reg)  # every generator distils
    assert reg["kl"].supports == ("variational", "primal", "dpo", "distill")
    assert reg["reverse_kl"].supports == ("variational", "dpo", "distill")
    assert reg["neyman"].supports == ("variational", "distill")
    assert reg["alpha"].supports == ("primal", "dpo", "distill")
    assert set(TRL_F_DIVERGENCES.values()) <= set(fk.DPO_DIVERGENCES)


@pytest.mark.parametrize("call,match", [
    (lambda x: fk.loss(logits=x[0], labels=x[1], divergence="alpha"),
     r"divergence='alpha' has no variational form.*fk.loss supports: .*js"),
    (lambda x: fk.primal_loss(logits=x[0], labels=x[1], divergence="reverse_kl"),
     r"divergence='reverse_kl' has no primal form.*fk.primal_loss supports: .*alpha"),
    (lambda x: fk.dpo_loss(x[2], x[2], x[2], x[2], beta=0.1, divergence="neyman"),
     r"divergence='neyman' has no dpo form.*fk.dpo_loss supports: .*forward_kl"),
    (lambda x: fk.dpo_loss(x[2], x[2], x[2], x[2], beta=0.1, divergence="wasserstein"),
     r"^unknown divergence 'wasserstein'; known: alpha, alpha_divergence, forward_kl, jensen_shannon, js, jsd, kl, "
     r"reverse_kl, rkl$"),
    (lambda x: FusedLinearFDivLoss(divergence="alpha"), "divergence='alpha' has no variational form"),
    (lambda x: DPOSpec(loss_type="bco_pair", divergence="js"),
     "applies to loss types sigmoid, robust, hinge, ipo, simpo, exo_pair, discopop, sigmoid_norm, sft, not bco_pair"),
])
def test_each_api_names_the_argument_and_its_names(call, match):
    x = (torch.randn(2, 3, V), torch.randint(0, V, (2, 3)), torch.zeros(2))
    with pytest.raises(ValueError, match=match):
        call(x)


def test_forward_kl_is_kl_everywhere():
    """``forward_kl`` is an alias of ``kl`` (``f = u log u``) in every API; in DPO that is standard
    DPO (TRL calls it reverse_kl, naming the direction from the policy)."""
    hidden, weight, labels = data(seed=7)
    a = fk.loss(hidden, weight, labels, divergence="forward_kl", backend="torch").loss
    assert torch.equal(a, fk.loss(hidden, weight, labels, divergence="kl", backend="torch").loss)
    a = fk.primal_loss(hidden, weight, labels, divergence="forward_kl", backend="torch").loss
    assert torch.equal(a, fk.primal_loss(hidden, weight, labels, divergence="kl", backend="torch").loss)
    g = torch.Generator().manual_seed(8)
    pc, pr, rc, rr = (-torch.rand(5, generator=g, dtype=torch.float64) * 20 for _ in range(4))
    std = -F.logsigmoid(0.1 * ((pc - pr) - (rc - rr)))
    for name in ("kl", "forward_kl"):
        torch.testing.assert_close(fk.dpo_loss(pc, pr, rc, rr, beta=0.1, divergence=name).losses, std)
    # the registry's reverse_kl (f = -log u) is TRL's forward_kl score 1 - exp(-lr)
    s = lambda lr: 1 - torch.exp(-lr)  # noqa: E731
    torch.testing.assert_close(fk.dpo_loss(pc, pr, rc, rr, beta=0.1, divergence="reverse_kl").losses,
                               -F.logsigmoid(0.1 * (s(pc - rc) - s(pr - rr))))


# ------------------------------------------------------------------------------------------
# DPO: the loss-type table, loss_type / divergence / alpha, and their former spellings
# ------------------------------------------------------------------------------------------

def test_dpo_loss_type_table():
    """TRL 1.16's DPOTrainer types (its reads of a reference, of label_smoothing, its length
    normalisation, its f_divergence_type list), CPO's simpo and ORPO's odds ratio."""
    rows = {t.name: (t.needs_reference, t.length_normalized, t.uses_label_smoothing, t.scored, t.form)
            for t in fk.DPO_LOSS_TYPES.values()}
    m, lr, srt = "margin", "logratios", "sorted"
    assert rows == {"sigmoid": (True, False, True, True, m), "robust": (True, False, True, True, m),
                    "hinge": (True, False, False, True, m), "ipo": (True, True, False, True, m),
                    "simpo": (False, True, True, True, m), "exo_pair": (True, False, True, True, m),
                    "nca_pair": (True, False, False, False, lr), "bco_pair": (True, False, False, False, lr),
                    "sppo_hard": (True, False, False, False, lr), "aot": (True, False, True, False, srt),
                    "aot_unpaired": (True, False, True, False, srt), "apo_zero": (True, False, False, False, lr),
                    "apo_down": (True, False, False, False, lr), "discopop": (True, False, False, True, m),
                    "sigmoid_norm": (True, True, False, True, m), "orpo": (False, True, False, False, "odds"),
                    "sft": (False, False, False, True, "nll")}
    for name, t in DPO_LOSS_TYPES.items():
        spec = DPOSpec(loss_type=name, label_smoothing=0.1 if name == "exo_pair" else 0.0)
        assert spec.needs_reference == t.needs_reference and spec.length_normalize == t.length_normalized
        assert FusedLinearDPOLoss(spec=spec).length_normalize == t.length_normalized


def test_dpo_spec_positional_and_keyword_agree():
    new = DPOSpec(loss_type="ipo", beta=0.3, divergence="js")
    assert DPOSpec("ipo", 0.3, divergence="js") == new and new.divergence is fk.DIVERGENCE_REGISTRY["js"]
    assert new.score is fk.DIVERGENCE_REGISTRY["js"].preference


def test_fused_linear_dpo_spec_and_head_keywords_agree():
    hidden, weight, labels = data(seed=10)
    ref = -torch.rand(4, dtype=torch.float64) * 20
    spec, head = DPOSpec(loss_type="hinge", beta=0.4, divergence="reverse_kl"), HeadSpec(softcap=3.0, backend="torch")
    mods = [FusedLinearDPOLoss(spec=spec, head=head), hf.dpo_loss_module(spec, head),
            FusedLinearDPOLoss(loss_type="hinge", beta=0.4, divergence="reverse_kl", softcap=3.0, backend="torch")]
    outs = [grads(lambda h, w, m=m: m(h, w, labels, ref_logp=ref), hidden, weight) for m in mods]
    # float64 reference: TRL's forward_kl score on soft-capped logits, hinge
    z = 3.0 * torch.tanh((hidden @ weight.T) / 3.0)
    lp = torch.log_softmax(z, -1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    s = (lp * (labels != -100)).sum(-1)
    sc = 1 - torch.exp(-(s - ref))
    want = torch.relu(1 - 0.4 * (sc[:2] - sc[2:])).mean()
    for out, g in outs:
        torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
        for x, y in zip(g, outs[0][1], strict=True):
            assert torch.equal(x, y)
    assert all(m.spec == spec and m.head == head for m in mods)
    with pytest.raises(ValueError, match="either as spec= or as keywords"):
        FusedLinearDPOLoss(spec=spec, beta=0.2)
    with pytest.raises(ValueError, match="either as head= or as keywords"):
        FusedLinearDPOLoss(head=head, softcap=2.0)
    with pytest.raises(TypeError, match="spec must be a DPOSpec"):
        FusedLinearDPOLoss(spec=FDivSpec())


# ------------------------------------------------------------------------------------------
# fk.nn f-divergence modules hold one spec (and a HeadSpec)
# ------------------------------------------------------------------------------------------

def test_fdiv_modules_hold_a_spec_built_from_keywords_or_given():
    hidden, weight, labels = data(seed=11)
    ref = -torch.rand(4, T, dtype=torch.float64)
    spec = FDivSpec("js", beta=0.5, level="sequence", values="detach")
    by_kw = FusedLinearFDivLoss(divergence="js", beta=0.5, level="sequence", values="detach", temperature=0.8,
                                backend="torch")
    given = FusedLinearFDivLoss(spec, HeadSpec(temperature=0.8, backend="torch"))
    assert by_kw.spec == given.spec == spec and by_kw.head == given.head
    assert by_kw.beta == 0.5 and by_kw.level == "sequence" and by_kw.temperature == 0.8 and by_kw.backend == "torch"
    a, b = by_kw(hidden, weight, labels, ref_logp=ref), given(hidden, weight, labels, ref_logp=ref)
    want = fk.loss(hidden, weight, labels, ref_logp=ref, divergence="js", beta=0.5, level="sequence",
                   values="detach", temperature=0.8, backend="torch").loss
    assert torch.equal(a, b) and torch.equal(a, want)
    z = hidden @ weight.T
    assert torch.equal(FDivLoss(spec)(z, labels, ref_logp=ref), FDivLoss(divergence="js", beta=0.5, level="sequence",
                                                                         values="detach")(z, labels, ref_logp=ref))
    with pytest.raises(ValueError, match="either as spec= or as keywords"):
        FDivLoss(spec, beta=0.2)
    with pytest.raises(TypeError, match="unknown loss option"):
        FDivLoss(divergance="js")
    with pytest.raises(ValueError, match="beta must be"):
        FDivLoss(beta=-1.0)
    assert FDivLoss(PrimalSpec("pearson")).spec == PrimalSpec("pearson")
    assert FusedLinearDPOLoss(loss_type="ipo").loss_type == "ipo"
    assert "spec=FDivSpec" in repr(given) and "HeadSpec" in repr(given)


# ------------------------------------------------------------------------------------------
# the package itself uses no deprecated name
# ------------------------------------------------------------------------------------------

@pytest.mark.filterwarnings("error::DeprecationWarning")
def test_main_paths_emit_no_deprecation_warning():
    from fdiv_kernels.train.config import DPOConfig, MixDPOConfig

    hidden, weight, labels = data(seed=12)
    ref = -torch.rand(4, dtype=torch.float64) * 10
    with warnings.catch_warnings():
        warnings.filterwarnings("error", category=DeprecationWarning, module="fdiv_kernels")
        fk.loss(hidden.requires_grad_(), weight, labels, divergence="js", shift=True, backend="torch",
                ref_logp=-torch.rand(4, T, dtype=torch.float64)).loss.backward()
        fk.primal_loss(hidden, weight, labels, divergence="alpha", backend="torch")
        logp, _ = fk.token_stats(hidden, weight, labels, backend="torch")
        fk.dpo_loss(logp.sum(-1)[:2], logp.sum(-1)[2:], ref[:2], ref[2:], beta=0.1, loss_type="ipo", divergence="js")
        for spec in (DPOConfig(loss_type="simpo").spec, DPOConfig(loss_type="ipo").spec, MixDPOConfig().spec):
            mod = hf.dpo_loss_module(spec, HeadSpec(backend="torch"))
            mod(hidden, weight, labels, ref_logp=None if not spec.needs_reference else ref, return_output=True)
            repr(mod)
        FusedLinearFDivLoss(spec=PrimalSpec("tv"))(hidden, weight, labels)
        FDivLoss(divergence="kl", level="sequence")(hidden @ weight.T, labels)


def test_modules_and_specs_pickle():
    """The registry's entries pickle by name, so the specs and the modules holding them do."""
    import copy
    import pickle

    hidden, weight, labels = data(seed=13)
    for mod in (FusedLinearFDivLoss(divergence="js", beta=0.3, backend="torch"),
                FusedLinearFDivLoss(spec=PrimalSpec("alpha", alpha=0.5), backend="torch"),
                FusedLinearDPOLoss(loss_type="simpo", backend="torch")):
        for back in (pickle.loads(pickle.dumps(mod)), copy.deepcopy(mod)):
            assert back.spec == mod.spec and back.head == mod.head
            assert torch.equal(back(hidden, weight, labels), mod(hidden, weight, labels))
