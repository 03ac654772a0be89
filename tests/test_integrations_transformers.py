"""The transformers patch against HF's own loss/gradients and plain float64 formulas, on tiny models."""

import copy
import math
import sys
import types

import pytest
import torch

import fdiv_kernels as fk
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from fdiv_kernels.integrations import transformers as fk_hf  # noqa: E402

V = 96
SMALL = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)


def _make(name, **over):
    cfg_cls = getattr(transformers, f"{name}Config")
    model_cls = getattr(transformers, f"{name}ForCausalLM")
    kw = dict(SMALL)
    if name in ("Gemma", "Gemma2"):
        kw["head_dim"] = 8
    if name == "Gemma2":
        kw.update(final_logit_softcapping=3.0, attn_implementation="eager")  # a small cap so it matters
    if name == "Cohere":
        kw["logit_scale"] = 0.5
    kw.update(over)
    torch.manual_seed(0)
    model = model_cls(cfg_cls(**kw)).float()
    with torch.no_grad():  # logits of size ~3 (not ~0.1) so that soft-caps and scales matter
        model.get_output_embeddings().weight.mul_(30)
    if name == "Phi":  # Phi's head has a bias; make it non-zero so it is tested
        with torch.no_grad():
            model.lm_head.bias.normal_(0, 0.5)
    return model


def _batch(seed=0, b=3, t=11):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    mask[1, -3:] = 0  # right padding
    labels = ids.clone()
    labels[:, :4] = -100  # prompt
    labels[mask == 0] = -100
    return ids, mask, labels


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


ARCHS = ["Llama", "Mistral", "Qwen2", "Gemma", "Gemma2", "Cohere", "Phi"]


@pytest.mark.parametrize("arch", ARCHS)
def test_sft_loss_and_grads_equal_hf(arch):
    ref = _make(arch)
    ours = copy.deepcopy(ref)
    fk_hf.apply(ours, divergence="sft", backend="torch")
    ids, mask, labels = _batch()
    out_ref = ref(input_ids=ids, attention_mask=mask, labels=labels)
    out = ours(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.logits is None and out.token_logp.shape == (3, 10)
    assert torch.allclose(out.loss, out_ref.loss, atol=1e-5, rtol=0), (out.loss, out_ref.loss)
    out_ref.loss.backward()
    out.loss.backward()
    g_ref, g = _grads(ref), _grads(ours)
    assert g.keys() == g_ref.keys() and len(g) > 5
    for n in g:
        assert torch.allclose(g[n], g_ref[n], atol=1e-5, rtol=1e-4), n


def test_tied_embeddings_and_num_items_in_batch():
    ref = _make("Llama", tie_word_embeddings=True)
    assert ref.lm_head.weight is ref.model.embed_tokens.weight
    ours = copy.deepcopy(ref)
    fk_hf.apply(ours)
    ids, mask, labels = _batch(seed=1)
    n = torch.tensor(40)  # HF Trainer's count over the whole accumulated batch
    a = ref(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=n).loss
    b = ours(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=n).loss
    assert torch.allclose(a, b, atol=1e-5)
    a.backward()
    b.backward()
    assert torch.allclose(ours.model.embed_tokens.weight.grad, ref.model.embed_tokens.weight.grad, atol=1e-5)


def test_shift_labels_kwarg_is_used_unshifted():
    ref = _make("Llama")
    ours = fk_hf.apply(copy.deepcopy(ref))
    ids, mask, labels = _batch(seed=2)
    shift = F.pad(labels, (0, 1), value=-100)[:, 1:]
    a = ref(input_ids=ids, attention_mask=mask, labels=labels).loss
    b = ours(input_ids=ids, attention_mask=mask, shift_labels=shift).loss
    assert torch.allclose(a, b, atol=1e-5)


def test_js_with_reference_matches_float64_formula():
    model = _make("Qwen2")
    ids, mask, labels = _batch(seed=3)
    ref_logp = -torch.rand(3, 11, dtype=torch.float32) * 4  # aligned with the unshifted labels
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits.double()
    beta = 0.4
    with fk_hf.patched(model, divergence="js", beta=beta):
        out = model(input_ids=ids, attention_mask=mask, labels=labels, ref_logp=ref_logp)
    y = labels[:, 1:]
    m = y != -100
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, y.clamp(min=0)[..., None]).squeeze(-1)
    u = beta * (logp - ref_logp[:, 1:].double())
    expect = -(math.log(2) + F.logsigmoid(u))[m].mean()
    assert abs(out.loss.item() - expect.item()) < 1e-5
    assert torch.allclose(out.token_logp[m].double(), logp[m], atol=1e-5)
    assert not fk_hf.is_patched(model)


def test_a_primal_loss_is_given_as_a_spec():
    from fdiv_kernels.specs import PrimalSpec
    model = _make("Llama")
    ids, mask, labels = _batch(seed=5)
    with fk_hf.patched(model, spec=PrimalSpec("alpha", alpha=0.5)):
        got = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    logits = model(input_ids=ids, attention_mask=mask).logits
    want = fk.primal_loss(logits=logits, labels=labels, shift=True, divergence="alpha", alpha=0.5).loss
    torch.testing.assert_close(got, want)
    with pytest.raises(TypeError, match=r"unknown loss option\(s\) \['alpha', 'form'\]"):
        fk_hf.apply(model, divergence="alpha", form="primal", alpha=0.5)  # the former spelling is gone


def test_no_labels_and_generate_unchanged_and_unapply_restores():
    model = _make("Gemma2")
    ids, mask, _ = _batch(seed=4)
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
        gen_before = model.generate(ids[:1, :5], max_new_tokens=4, do_sample=False)
    fk_hf.apply(model)
    assert "forward" in vars(model)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, before)
        assert torch.equal(model.generate(ids[:1, :5], max_new_tokens=4, do_sample=False), gen_before)
    fk_hf.apply(model, divergence="kl")  # re-patch replaces the options, keeps one wrapper
    assert fk_hf.is_patched(model)
    fk_hf.unapply(model)
    assert "forward" not in vars(model) and not fk_hf.is_patched(model)
    out = model(input_ids=ids, attention_mask=mask, labels=ids)
    assert out.logits is not None  # the original forward again


def test_return_dict_false_and_positional_args():
    ref = _make("Mistral")
    ours = fk_hf.apply(copy.deepcopy(ref))
    ids, mask, labels = _batch(seed=5)
    tup = ours(ids, mask, labels=labels, return_dict=False)
    assert isinstance(tup, tuple)
    assert torch.allclose(tup[0], ref(ids, mask, labels=labels).loss, atol=1e-5)


def test_clear_errors_name_the_class():
    base = transformers.LlamaModel(transformers.LlamaConfig(**SMALL))
    with pytest.raises(TypeError, match="LlamaModel.*no LM head"):
        fk_hf.apply(base)
    model = _make("Llama")
    model.lm_head.bias = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(TypeError, match="LlamaForCausalLM: unsupported LM head bias"):
        fk_hf.apply(model)
    model = _make("Llama")
    model.lm_head.weight = torch.nn.Parameter(torch.zeros(V, 32, dtype=torch.int8), requires_grad=False)
    with pytest.raises(TypeError, match="LlamaForCausalLM.*quantized"):
        fk_hf.apply(model)
    model = _make("Llama")
    model.lm_head.lora_A = torch.nn.ModuleDict()  # what a LoRA-wrapped head looks like
    with pytest.raises(TypeError, match="LlamaForCausalLM.*adapter"):
        fk_hf.apply(model)
    with pytest.raises(ValueError, match="unknown divergence"):
        fk_hf.apply(_make("Llama"), divergence="wasserstein")


def test_zero3_branch_gathers_head_with_fake_deepspeed(monkeypatch):
    """A head weight carrying ZeRO-3 metadata is gathered with deepspeed.zero.GatheredParameters
    and registered as an external parameter of the model; a plain weight never imports deepspeed."""
    calls = []

    class Gathered:
        def __init__(self, params, modifier_rank=None):
            calls.append(("gather", [tuple(p.shape) for p in params], modifier_rank))

        def __enter__(self):
            calls.append(("enter",))

        def __exit__(self, *exc):
            calls.append(("exit",))
            return False

    zero = types.SimpleNamespace(GatheredParameters=Gathered,
                                 register_external_parameter=lambda m, p: calls.append(("external", type(m).__name__)))
    monkeypatch.setitem(sys.modules, "deepspeed", types.SimpleNamespace(zero=zero))

    ref = _make("Llama")
    ours = copy.deepcopy(ref)
    w = ours.lm_head.weight
    w.ds_id = 7
    w.ds_status = types.SimpleNamespace(name="NOT_AVAILABLE")
    fk_hf.apply(ours)
    assert calls == [("external", "LlamaForCausalLM")]
    ids, mask, labels = _batch(seed=6)
    out = ours(input_ids=ids, attention_mask=mask, labels=labels)
    assert calls[1:] == [("gather", [(V, 32)], None), ("enter",), ("exit",)]
    assert torch.allclose(out.loss, ref(input_ids=ids, attention_mask=mask, labels=labels).loss, atol=1e-5)
    w.ds_status = types.SimpleNamespace(name="AVAILABLE")  # already gathered (e.g. tied): no second gather
    calls.clear()
    ours(input_ids=ids, attention_mask=mask, labels=labels)
    assert calls == []


def test_output_carries_body_fields_and_pickles():
    import pickle

    model = fk_hf.apply(_make("Llama"))
    ids, mask, labels = _batch(seed=7)
    out = model(input_ids=ids, attention_mask=mask, labels=labels, output_hidden_states=True, use_cache=False)
    assert isinstance(out, fk_hf.FDivCausalLMOutput)
    assert len(out.hidden_states) == 3 and out.hidden_states[-1].shape == (3, 11, 32)
    back = pickle.loads(pickle.dumps(fk_hf.FDivCausalLMOutput(loss=out.loss.detach(), token_logp=out.token_logp.detach())))
    assert isinstance(back, fk_hf.FDivCausalLMOutput) and torch.equal(back.token_logp, out.token_logp)


def test_patched_forward_never_calls_the_head_module():
    """With labels the [B, T, V] logits are never built: the LM head module is not called at all."""
    model = fk_hf.apply(_make("Qwen2"))
    calls = []
    model.lm_head.register_forward_hook(lambda *a: calls.append(a[2].shape))
    ids, mask, labels = _batch(seed=8)
    model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    assert calls == []
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)  # without labels: the original forward, with logits
    assert calls == [(3, 11, V)]


@pytest.mark.parametrize("softcap,temperature,bias", [(None, 1.0, False), (3.0, 0.7, True)])
def test_token_head_metrics_equal_full_logits(softcap, temperature, bias):
    """Mean logit over the vocabulary and label==argmax, tiled (3 row x 4 vocab tiles), vs float64 logits."""
    from fdiv_kernels.integrations.transformers import token_head_metrics

    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(2, 5, 8, generator=g), torch.randn(29, 8, generator=g)
    b = torch.randn(29, generator=g) if bias else None
    z = h.double() @ w.double().T + (b.double() if bias else 0)
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    z = z / temperature
    y = z.argmax(-1)
    y[0, 1] = (y[0, 1] + 1) % 29  # a wrong label
    y[1, 3] = -100
    mean, top1 = token_head_metrics(h, w, y, bias=b, softcap=softcap, temperature=temperature, vocab_chunk=8,
                                    row_chunk=4)
    keep = y != -100
    torch.testing.assert_close(mean[keep].double(), z.mean(-1)[keep], rtol=1e-5, atol=1e-5)
    assert torch.equal(top1, (z.argmax(-1) == y) & keep) and not top1[0, 1] and top1.sum() == keep.sum() - 1
    assert mean[1, 3] == 0
