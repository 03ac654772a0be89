"""fdiv_kernels.hf: the logit transform of every supported scale against the models' own forward,
and the trainer, the analysis tools and the patch applying it (tiny Cohere / Granite / ... models
built from configs, float64 full-logits references)."""

import math
import sys
import types

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from train_batches import TOK, pair_batch, pair_rows, sft_batch  # noqa: E402
from train_batches import full_logp as _full_logp  # noqa: E402

import fdiv_kernels as fk  # noqa: E402
from fdiv_kernels import hf  # noqa: E402
from fdiv_kernels.specs import DPOSpec, FDivSpec, HeadSpec  # noqa: E402
from fdiv_kernels import collate as C  # noqa: E402
from fdiv_kernels.train import steps as S  # noqa: E402
from fdiv_kernels.train.config import DPOConfig, SFTConfig  # noqa: E402

SMALL = dict(vocab_size=len(TOK), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, pad_token_id=TOK.pad_token_id,
             bos_token_id=TOK.bos_token_id, eos_token_id=TOK.eos_token_id)
#: arch -> config options: each of the model's logit transforms at a value far from 1
SCALED = {
    "Cohere": dict(logit_scale=0.25),                       # logits * 0.25
    "Granite": dict(logits_scaling=4.0),                    # logits / 4
    "HyperCLOVAX": dict(logits_scaling=3.0),                # logits * 3 (the same name as Granite's)
    "Gemma2": dict(final_logit_softcapping=2.0, head_dim=8, attn_implementation="eager"),
    "Llama": {},
}


def _model(arch, seed=0, **over):
    cfg = getattr(transformers, f"{arch}Config")(**{**SMALL, **SCALED[arch], **over})
    torch.manual_seed(seed)
    model = getattr(transformers, f"{arch}ForCausalLM")(cfg).double().eval()
    with torch.no_grad():  # logits of size ~3 so that scales and caps change the loss visibly
        model.get_output_embeddings().weight.mul_(15)
    return model


def _sft_batch():
    return sft_batch(4)


def _pair_batch():
    return pair_batch(3)


# --------------------------------------------------------------------------------------------
# the transform itself
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", list(SCALED))
def test_fused_statistics_equal_the_models_own_logits(arch):
    model, batch = _model(arch), _sft_batch()
    with torch.no_grad():
        x = hf.head_inputs(model, batch["input_ids"], batch["attention_mask"], backend="torch")
        st = fk.token_stats(x.hidden[:, :-1], x.weight, batch["labels"][:, 1:], bias=x.bias, softcap=x.head.softcap,
                            temperature=x.head.temperature, backend="torch")
        logp, mask, logits = _full_logp(model, batch)
    torch.testing.assert_close(st.logp, logp, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(st.lse[mask], torch.logsumexp(logits, -1)[mask], rtol=1e-10, atol=1e-10)


def test_logit_transform_reads_each_scale():
    assert hf.logit_transform(_model("Cohere")) == (None, 0.25)
    assert hf.logit_transform(_model("Granite")) == (None, 0.25)
    assert hf.logit_transform(_model("HyperCLOVAX")) == (None, 3.0)
    assert hf.logit_transform(_model("Gemma2")) == (2.0, 1.0)
    assert hf.head_spec(_model("Granite")) == HeadSpec(None, 4.0)  # exactly logits_scaling, no 1/(1/x)
    assert hf.head_spec(_model("Cohere"), temperature=0.5, backend="torch") == HeadSpec(None, 2.0, "torch")


def _fake(model_type, **cfg):
    return types.SimpleNamespace(config=types.SimpleNamespace(model_type=model_type, **cfg))


def test_scale_and_softcap_together_equal_cap_of_the_scaled_logits():
    """MuseSpark: ``cap * tanh(mult * z / cap)``; the head spec reproduces it as ``cap'(z) / T``."""
    head = hf.head_spec(_fake("muse_spark", output_multiplier=0.5, final_logit_softcapping=3.0), temperature=0.7)
    z = torch.linspace(-40, 40, 201, dtype=torch.float64)
    expect = 3.0 * torch.tanh(0.5 * z / 3.0) / 0.7
    got = head.softcap * torch.tanh(z / head.softcap) / head.temperature
    torch.testing.assert_close(got, expect, rtol=1e-12, atol=1e-12)


def test_unknown_or_unreadable_transforms_are_refused():
    with pytest.raises(NotImplementedError, match="logits_scaling=2.0 on model type 'mystery'.*LOGIT_SCALES"):
        hf.logit_transform(_fake("mystery", logits_scaling=2.0))
    assert hf.logit_transform(_fake("mystery", logits_scaling=1.0)) == (None, 1.0)
    with pytest.raises(ValueError, match="logit_scale=-1.0"):
        hf.logit_transform(_fake("cohere", logit_scale=-1.0))
    model = _model("Llama")
    model.lm_head.logit_scale = torch.nn.Parameter(torch.ones(len(TOK)))  # a per-token scale (as Dory's head)
    with pytest.raises(TypeError, match="LlamaForCausalLM: its LM head Linear has parameters besides weight and bias"):
        hf.head_of(model)


# --------------------------------------------------------------------------------------------
# the trainer, the analysis tools and the patch apply it
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["Cohere", "Granite"])
def test_trainer_sft_step_applies_the_logit_scale(arch):
    m, batch = _model(arch), _sft_batch()
    cfg = SFTConfig(divergence="sft")
    loss, st = S.sft_micro(m, batch, cfg=cfg, ref_logp=None, norm=S.Norm(S.sft_units(batch, cfg), 1, 1),
                           backend="torch")
    loss.backward()
    g = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    _, mask, logits = _full_logp(m, batch)
    ref = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1))
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-9, atol=1e-12)
    for a, b in zip(g, (p.grad for p in m.parameters())):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
    v0 = torch.logsumexp(logits[torch.arange(mask.shape[0]), mask.float().argmax(1)], -1).mean().detach()
    assert st["value_s0"][0] / st["value_s0"][1] == pytest.approx(float(v0), rel=1e-9)


@pytest.mark.parametrize("arch,kind", [("Cohere", "sigmoid"), ("Granite", "ipo")])
def test_trainer_dpo_step_applies_the_logit_scale(arch, kind):
    m, ref_m, batch = _model(arch), _model(arch, seed=1), _pair_batch()
    cfg = DPOConfig(loss_type=kind, beta=0.5)
    ref = S.reference_pair_logps(ref_m, batch, spec=cfg.spec, backend="torch")
    loss, st = S.dpo_micro(m, batch, cfg=cfg, ref=ref, norm=S.Norm(3, 1, 1), backend="torch")
    with torch.no_grad():
        logp, mask, _ = _full_logp(m, batch)
        rlogp, _, _ = _full_logp(ref_m, batch)
    seq, rseq = logp.sum(1), rlogp.sum(1)
    if kind == "ipo":
        seq, rseq = seq / mask.sum(1), rseq / mask.sum(1)
    h = (seq[:3] - seq[3:]) - (rseq[:3] - rseq[3:])
    hand = (-F.logsigmoid(0.5 * h) if kind == "sigmoid" else (h - 1 / (2 * 0.5)) ** 2).mean()
    torch.testing.assert_close(loss, hand, rtol=1e-9, atol=1e-12)
    assert st["logp_chosen"][0] / st["logp_chosen"][1] == pytest.approx(float(logp[:3].sum() / mask[:3].sum()),
                                                                       rel=1e-9)


@pytest.mark.parametrize("arch", ["Cohere", "Granite"])
def test_trainer_log_mean_exp_step_over_micro_batches_applies_the_logit_scale(arch):
    """kl (``values="free"``, z-loss) accumulated over 2 micro-batches by the loop's StepBackward =
    the hand formula on the model's own (scaled) logits; the held-out KL metric likewise."""
    from fdiv_kernels.train.accumulate import StepBackward
    from fdiv_kernels.train.config import OptimConfig, RunConfig
    from fdiv_kernels.train.distributed import DistInfo
    from fdiv_kernels.train.engines import LocalEngine
    from fdiv_kernels.train.evaluate import mean_logratio

    m, ref_m, batch = _model(arch), _model(arch, seed=1), _sft_batch()
    cfg = SFTConfig(divergence="kl", beta=0.5, values="free", z_loss=0.1)
    ref = S.reference_token_logp(ref_m, batch, backend="torch")
    pieces = [slice(0, 2), slice(2, batch["input_ids"].shape[0])]
    engine = LocalEngine(m, OptimConfig(), RunConfig(), DistInfo(), torch.device("cpu"), micro_batch_size=1,
                         grad_accum=2, phase="sft")
    norm = S.Norm(S.sft_units(batch, cfg), 2, 1, S.sft_counts(batch))
    step = StepBackward(engine, num_micro=2, world_size=1, device=torch.device("cpu"))
    logged = 0.0
    for i, sl in enumerate(pieces):
        loss, st = S.sft_micro(engine.module, {k: v[sl] for k, v in batch.items()}, cfg=cfg, ref_logp=ref[sl],
                               norm=norm, backend="torch")
        step(i, loss)
        logged += st["loss"][0]
    logged += step.log_mean_exp()
    g = [p.grad.clone() for p in m.parameters()]
    m.zero_grad(set_to_none=True)
    logp, mask, logits = _full_logp(m, batch)
    with torch.no_grad():
        rlogp, _, _ = _full_logp(ref_m, batch)
    lse = torch.logsumexp(logits, -1)
    us, v0 = [], []
    for r in range(mask.shape[0]):
        pos = mask[r].nonzero().flatten().tolist()
        us.append(0.5 * (logp[r, pos] - rlogp[r, pos]) + lse[r, pos] - lse[r, pos[1:] + pos[-1:]])
        v0.append(lse[r, pos[0]])
    u = torch.cat(us)
    hand = torch.logsumexp(-u - 1, 0) - math.log(u.numel()) + torch.stack(v0).mean() + 0.1 * (lse[mask] ** 2).mean()
    hand.backward()
    assert logged == pytest.approx(float(hand.detach()), rel=1e-9)
    for a, b in zip(g, (p.grad for p in m.parameters())):
        # the models' RMSNorm casts to fp32, which rounds the backward's incoming gradient at each
        # micro-batch's own scale (float64 throughout: tests/test_train_accumulate.py, to 1e-9)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    kl = mean_logratio(m, ref_m, [batch], backend="torch")
    assert kl == pytest.approx(float(((logp - rlogp)[mask]).mean().detach()), rel=1e-9)


@pytest.mark.parametrize("arch", ["Cohere", "Granite"])
def test_analysis_value_s0_applies_the_logit_scale(arch):
    """``fdiv-analyze values``' V(s0): lse of the model's own (scaled) logits at each prompt's last token."""
    from fdiv_kernels.analysis import value_s0

    model = _model(arch)
    prompts = ["12+7=", "3*4=?", "a"]
    got = value_s0(model, TOK, prompts, batch_size=2, backend="torch")
    for p, v in zip(prompts, got):
        ids = torch.tensor([TOK(p, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            want = torch.logsumexp(model(input_ids=ids).logits[0, -1].double(), -1)
        assert float(v) == pytest.approx(float(want), rel=1e-6)


@pytest.mark.parametrize("arch", ["Cohere", "Granite", "Gemma2"])
def test_analysis_values_apply_the_logit_transform(arch):
    from fdiv_kernels.analysis import state_values
    from fdiv_kernels.analysis.alignment import AlignmentEval

    model, batch = _model(arch), _sft_batch()
    pos = batch["attention_mask"].bool()
    v = state_values(model, batch["input_ids"], pos, attention_mask=batch["attention_mask"], backend="torch")
    with torch.no_grad():
        full = torch.logsumexp(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, -1)
    torch.testing.assert_close(v[pos].double(), full[pos], rtol=1e-6, atol=1e-6)
    # the alignment metric: a sigmoid DPO loss of the model against a reference, from the models' own logits
    ref_m = _model(arch, seed=1)
    pairs = pair_rows(3)
    res = AlignmentEval(ref_m, pairs, pad_id=TOK.pad_token_id, beta=0.5, batch_size=2, device=torch.device("cpu"),
                        backend="torch")(model)
    pb = C.collate_pairs(pairs, pad_id=TOK.pad_token_id)
    with torch.no_grad():
        s, _, _ = _full_logp(model, pb)
        r, _, _ = _full_logp(ref_m, pb)
    lr = s.sum(1) - r.sum(1)
    h = lr[:3] - lr[3:]
    assert res["align_dpo_loss"] == pytest.approx(float(-F.logsigmoid(0.5 * h).mean()), rel=1e-6)
    assert res["align_accuracy"] == pytest.approx(float((h > 0).double().mean()))


def test_patch_in_dpo_mode_equals_the_formula_from_full_logits():
    from fdiv_kernels.integrations import transformers as fk_hf

    model, batch = _model("Cohere"), _pair_batch()
    ref = -torch.rand(6, dtype=torch.float64) * 20
    fk_hf.apply(model, DPOSpec(loss_type="sigmoid", beta=0.3), backend="torch")
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                ref_logp=ref, return_token_metrics=True)
    fk_hf.unapply(model)
    logp, mask, logits = _full_logp(model, batch)
    s = logp.sum(1)
    h = (s[:3] - s[3:]) - (ref[:3] - ref[3:])
    torch.testing.assert_close(out.loss, -F.logsigmoid(0.3 * h).mean(), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(out.reward, (0.3 * (s - ref)).detach(), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(out.token_logp, logp.detach(), rtol=1e-9, atol=1e-9)  # from the metrics pass
    p = torch.softmax(logits, -1)
    ent = -(p * torch.log_softmax(logits, -1)).sum(-1)
    torch.testing.assert_close(out.token_entropy[mask], ent[mask].detach(), rtol=1e-9, atol=1e-9)


def test_patch_config_holds_specs():
    from fdiv_kernels.integrations import transformers as fk_hf

    model = fk_hf.apply(_model("Granite"), divergence="js", beta=0.5, level="sequence", temperature=2.0)
    cfg = fk_hf.patch_config(model)
    assert cfg.loss == FDivSpec("js", beta=0.5, level="sequence") and cfg.head == HeadSpec(None, 8.0)
    assert cfg.sums_over_num_items
    with pytest.raises(TypeError, match=r"unknown loss option\(s\) \['betta'\]"):
        fk_hf.apply(model, betta=0.1)
    with pytest.raises(ValueError, match="either as a spec or as options"):
        fk_hf.apply(model, FDivSpec("js"), beta=0.2)
    with pytest.raises(ValueError, match="reduction='mean'"):
        fk_hf.apply(model, FDivSpec("js", reduction="sum"))
    fk_hf.apply(model, DPOSpec(loss_type="ipo"))
    assert isinstance(fk_hf.patch_config(model).loss, DPOSpec) and not fk_hf.patch_config(model).sums_over_num_items


# --------------------------------------------------------------------------------------------
# shared helpers: gathering
# --------------------------------------------------------------------------------------------

def test_gathered_deduplicates_tied_weights_and_registers_each_once(monkeypatch):
    calls = []

    class Gathered:
        def __init__(self, params, modifier_rank=None):
            calls.append(("gather", len(params)))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    zero = types.SimpleNamespace(GatheredParameters=Gathered,
                                 register_external_parameter=lambda m, p: calls.append(("external", tuple(p.shape))))
    monkeypatch.setitem(sys.modules, "deepspeed", types.SimpleNamespace(zero=zero))
    w = torch.nn.Parameter(torch.zeros(5, 3))
    w.ds_id, w.ds_status = 1, types.SimpleNamespace(name="NOT_AVAILABLE")
    with hf.gathered(w, None, w):
        pass
    assert hf.register_external(torch.nn.Linear(1, 1), [w, w, None]) == 1
    assert calls == [("gather", 1), ("external", (5, 3))]
    assert hf.register_external(torch.nn.Linear(1, 1), [torch.zeros(2)]) == 0


def test_sft_config_lists_exactly_the_spec_fields():
    """``sft.*`` holds FDivSpec's options (flat in the YAML) with its defaults: no copy can drift."""
    import dataclasses

    from fdiv_kernels.train.config import SFT_LOSS_FIELDS

    spec_fields = {f.name: f.default for f in dataclasses.fields(FDivSpec) if f.name != "reduction"}
    sft = SFTConfig()
    assert set(SFT_LOSS_FIELDS) == set(spec_fields)
    assert {k: getattr(sft, k) for k in SFT_LOSS_FIELDS} == spec_fields
    assert SFTConfig(divergence="js", beta=0.5).loss_spec(reduction="sum") == FDivSpec("js", beta=0.5,
                                                                                        reduction="sum")
    assert DPOConfig(loss_type="simpo", beta=2.0, gamma=1.0).spec == DPOSpec(loss_type="simpo", beta=2.0, gamma=1.0)
    assert not DPOConfig(loss_type="simpo").spec.needs_reference and DPOConfig(loss_type="ipo").spec.length_normalize
    assert math.isclose(SFTConfig().beta, 1.0)


def test_dpo_module_without_gradients_equals_the_fused_pass():
    """Evaluation (AlignmentEval, TRL's prediction_step) runs the DPO module under no_grad: the
    whole-batch path, which must give the fused pass's value."""
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(4, 6, 8, generator=g, dtype=torch.float64), torch.randn(11, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 11, (4, 6), generator=g)
    y[:, :2] = -100
    ref = -torch.rand(4, generator=g, dtype=torch.float64) * 10
    loss_fn = hf.dpo_loss_module(DPOSpec(loss_type="ipo", beta=0.4), HeadSpec(backend="torch"))
    with torch.no_grad():
        a = loss_fn(h, w, y, ref_logp=ref)
    b = loss_fn(h.requires_grad_(), w, y, ref_logp=ref)
    torch.testing.assert_close(a, b.detach(), rtol=1e-12, atol=1e-12)


def test_token_head_stats_in_tiles_equal_full_logits():
    from fdiv_kernels.integrations.transformers import token_head_stats

    g = torch.Generator().manual_seed(1)
    h = torch.randn(5, 7, 6, generator=g, dtype=torch.float64) * 2
    w = torch.randn(23, 6, generator=g, dtype=torch.float64)
    b = torch.randn(23, generator=g, dtype=torch.float64)
    y = torch.randint(0, 23, (5, 7), generator=g)
    y[0] = -100
    st = token_head_stats(h, w, y, bias=b, softcap=4.0, temperature=0.8, vocab_chunk=5, row_chunk=4)
    z = 4.0 * torch.tanh((h @ w.T + b) / 4.0) / 0.8
    m = y != -100
    logp = torch.log_softmax(z, -1)
    torch.testing.assert_close(st.logp[m], logp.gather(-1, y.clamp(min=0)[..., None]).squeeze(-1)[m])
    torch.testing.assert_close(st.entropy[m], -(logp.exp() * logp).sum(-1)[m])
    torch.testing.assert_close(st.mean_logit[m], z.mean(-1)[m])
    assert torch.equal(st.is_top1, (z.argmax(-1) == y) & m) and not st.logp[0].any()
