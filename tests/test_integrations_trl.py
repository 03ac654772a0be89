"""TRL recipes on a tiny Llama with a locally built tokenizer (no hub), on CPU.

Checks: FDivSFTTrainer(divergence="sft") == TRL's SFTTrainer loss (same batch, and over a few
training steps); FDivSFTTrainer(js + reference) == a float64 formula from full logits;
FDivDPOTrainer == TRL's DPOTrainer for sigmoid, ipo and JS f-DPO (same batch, and over a few steps),
and on one batch for every other TRL 1.16 loss type and weighted combinations (MPO, RPO).
"""

import copy
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

import fdiv_kernels as fk  # noqa: E402
from fdiv_kernels.integrations.trl import FDivDPOTrainer, FDivSFTTrainer  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")  # TRL/transformers deprecations

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
import _tiny  # noqa: E402  (the examples' offline tokenizer and tiny Llama)

tiny_tokenizer = _tiny.tiny_tokenizer


def tiny_llama(tok, seed=0):
    model = _tiny.tiny_llama(tok, seed=seed)
    with torch.no_grad():
        model.lm_head.weight.mul_(20)  # logits of size ~2 so that the objectives differ visibly
    return model


def sft_dataset():
    return datasets.Dataset.from_dict({"text": [
        "the cat sat on the mat", "a dog ran fast", "the big red dog sat", "a small blue cat ran slow",
        "the dog and the cat sat", "a red cat then ran"] * 2})


def dpo_dataset():
    return datasets.Dataset.from_dict({
        "prompt": ["the cat", "a dog", "the big", "a small"] * 2,
        "chosen": [" sat on the mat", " ran fast", " red dog sat", " blue cat"] * 2,
        "rejected": [" ran", " sat on a mat slow", " dog", " cat ran slow fast"] * 2})


def _common(tmp_path, name, **kw):
    # SGD, not Adam: Adam's first step is ~lr*sign(g) and turns float noise in near-zero gradients
    # into full-size updates, so two equal losses would not give equal trajectories. fp32 (TRL defaults
    # to bf16 autocast, also on CPU), so that both trainers see the same numbers.
    return dict(output_dir=str(tmp_path / name), per_device_train_batch_size=4, learning_rate=0.1, optim="sgd",
                logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, seed=0, disable_tqdm=True, bf16=False,
                gradient_checkpointing=False, **kw)


def _losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def _sft_pair(tmp_path, fdiv=None, ref_model=None, steps=3, **config):
    tok = tiny_tokenizer()
    model = tiny_llama(tok)
    ds = sft_dataset()
    ref_tr = trl.SFTTrainer(model=copy.deepcopy(model),
                            args=trl.SFTConfig(**_common(tmp_path, "a", max_steps=steps, **config)),
                            train_dataset=ds, processing_class=tok)
    ours = FDivSFTTrainer(model=model, args=trl.SFTConfig(**_common(tmp_path, "b", max_steps=steps, **config)),
                          train_dataset=ds, processing_class=tok, fdiv=fdiv, ref_model=ref_model)
    return ref_tr, ours


@pytest.mark.parametrize("config", [{}, {"label_smoothing_factor": 0.1}], ids=["nll", "label_smoothing"])
def test_sft_nll_equals_trl_on_a_batch_and_over_training(tmp_path, config):
    """With ``label_smoothing_factor`` TRL computes HF's ``LabelSmoother`` on full logits; ours is fused."""
    ref_tr, ours = _sft_pair(tmp_path, **config)
    batch = next(iter(ours.get_train_dataloader()))
    assert (batch["labels"] == -100).any()  # padding is in the batch
    a = ref_tr.compute_loss(ref_tr.model, dict(batch))
    b = ours.compute_loss(ours.model, dict(batch))
    assert torch.allclose(a, b, atol=1e-5), (a, b)
    # TRL's mean_token_accuracy, ours read off the fused pass's logits
    acc = [tr._metrics["train" if tr.model.training else "eval"]["mean_token_accuracy"][-1] for tr in (ref_tr, ours)]
    assert abs(acc[0] - acc[1]) < 1e-6 and 0.0 < acc[0] < 1.0, acc
    n = torch.tensor(50)
    a = ref_tr.compute_loss(ref_tr.model, dict(batch), num_items_in_batch=n)
    b = ours.compute_loss(ours.model, dict(batch), num_items_in_batch=n)
    assert torch.allclose(a, b, atol=1e-5), (a, b)
    ref_tr.train()
    ours.train()
    la, lb = _losses(ref_tr), _losses(ours)
    assert len(la) == len(lb) == 3 and lb[-1] < lb[0]
    assert all(abs(x - y) < 1e-4 for x, y in zip(la, lb)), (la, lb)


def test_sft_js_with_reference_model_matches_formula(tmp_path):
    tok = tiny_tokenizer()
    ref_model = tiny_llama(tok, seed=1)
    beta = 0.5
    _, ours = _sft_pair(tmp_path, fdiv={"divergence": "js", "beta": beta}, ref_model=ref_model, steps=2)
    batch = next(iter(ours.get_train_dataloader()))
    got = ours.compute_loss(ours.model, dict(batch))
    with torch.no_grad():
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        pol = ours.model.forward.__wrapped__(ours.model, input_ids=ids, attention_mask=mask).logits.double()
        ref = ref_model.forward.__wrapped__(ref_model, input_ids=ids, attention_mask=mask).logits.double()
    y = labels[:, 1:]
    m = y != -100

    def lp(z):
        return torch.log_softmax(z[:, :-1], -1).gather(-1, y.clamp(min=0)[..., None]).squeeze(-1)

    u = beta * (lp(pol) - lp(ref))
    expect = -(math.log(2) + F.logsigmoid(u))[m].mean()
    assert abs(got.item() - expect.item()) < 1e-5, (got, expect)
    before = copy.deepcopy(ours.model.state_dict())
    ours.train()
    assert all(math.isfinite(x) for x in _losses(ours))
    assert any(not torch.equal(before[k], v) for k, v in ours.model.state_dict().items())
    assert any(k.startswith("fdiv/reward") for h in ours.state.log_history for k in h)


def _dpo_trainers_on_a_batch(tmp_path, **cfg):
    """TRL's DPOTrainer and FDivDPOTrainer with the same DPOConfig (``cfg``), models and data; their
    losses on the same first batch (equal to 1e-5)."""
    tok = tiny_tokenizer()
    model, ds = tiny_llama(tok), dpo_dataset()
    ref_model = tiny_llama(tok, seed=1)  # a reference different from the policy: non-zero log-ratios
    args = lambda name: trl.DPOConfig(**_common(tmp_path, name, beta=0.1, **cfg))  # noqa: E731
    theirs = trl.DPOTrainer(model=copy.deepcopy(model), ref_model=copy.deepcopy(ref_model), args=args("a"),
                            train_dataset=ds, processing_class=tok)
    ours = FDivDPOTrainer(model=model, ref_model=ref_model, args=args("b"), train_dataset=ds, processing_class=tok)
    batch = next(iter(ours.get_train_dataloader()))
    a = theirs.compute_loss(theirs.model, dict(batch))
    b = ours.compute_loss(ours.model, dict(batch))
    assert torch.allclose(a, b, atol=1e-5, rtol=1e-5), (a, b)
    return theirs, ours, a, b


@pytest.mark.parametrize("loss_type,f_div", [("sigmoid", "reverse_kl"), ("ipo", "reverse_kl"),
                                             ("sigmoid", "js_divergence")])
def test_dpo_equals_trl(tmp_path, loss_type, f_div):
    theirs, ours, a, b = _dpo_trainers_on_a_batch(tmp_path, max_steps=2, loss_type=[loss_type],
                                                  f_divergence_type=f_div)
    # every metric TRL's DPOTrainer logs, equal on the same batch
    mt, mo = theirs._metrics["train"], ours._metrics["train"]
    assert set(mt) <= set(mo), set(mt) - set(mo)
    for k in mt:
        assert mo[k] == pytest.approx(mt[k], rel=1e-5, abs=1e-6), (k, mo[k], mt[k])
    assert {"entropy", "num_tokens", "logits/chosen", "logits/rejected", "mean_token_accuracy"} <= set(mt)
    theirs._metrics["train"].clear()
    ours._metrics["train"].clear()
    theirs.train()
    ours.train()
    la, lb = _losses(theirs), _losses(ours)
    assert len(la) == len(lb) == 2
    assert all(abs(x - y) < 1e-4 * max(1.0, abs(x)) for x, y in zip(la, lb)), (la, lb)
    acc = [h["rewards/accuracies"] for h in ours.state.log_history if "rewards/accuracies" in h]
    assert len(acc) == 2


@pytest.mark.parametrize("loss_type,weights,ls", [
    (["hinge"], None, 0.0), (["exo_pair"], None, 1e-3), (["nca_pair"], None, 0.0), (["robust"], None, 0.2),
    (["bco_pair"], None, 0.0), (["sppo_hard"], None, 0.0), (["aot"], None, 0.1), (["aot_unpaired"], None, 0.0),
    (["apo_zero"], None, 0.0), (["apo_down"], None, 0.0), (["discopop"], None, 0.0), (["sft"], None, 0.0),
    (["sigmoid_norm"], None, 0.0), (["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0], 0.0),  # MPO
    (["sigmoid", "sft"], [1.0, 0.3], 0.0), (["apo_zero", "exo_pair"], [0.5, 2.0], 0.05)])
def test_every_trl_loss_type_equals_trl_on_a_batch(tmp_path, loss_type, weights, ls):
    theirs, ours, a, b = _dpo_trainers_on_a_batch(tmp_path, max_steps=1, loss_type=loss_type, loss_weights=weights,
                                                  label_smoothing=ls, discopop_tau=0.2)
    ga = torch.autograd.grad(a, theirs.model.lm_head.weight)[0]
    gb = torch.autograd.grad(b, ours.model.lm_head.weight)[0]
    assert torch.allclose(ga, gb, atol=1e-5, rtol=1e-4), float((ga - gb).abs().max())


@pytest.mark.parametrize("kw,match", [(dict(loss_type=["sigmoid", "ipo"]), "length_normalize"),
                                      (dict(loss_type=["sigmoid", "robust"], label_smoothing=0.1), "label_smoothing"),
                                      (dict(loss_type=["sigmoid"], use_weighting=True), "use_weighting")])
def test_dpo_unsupported_variant_is_refused(tmp_path, kw, match):
    tok = tiny_tokenizer()
    model = tiny_llama(tok)
    args = trl.DPOConfig(**_common(tmp_path, "c", max_steps=1, **kw))
    with pytest.raises(NotImplementedError, match=match):
        FDivDPOTrainer(model=model, ref_model=copy.deepcopy(model), args=args, train_dataset=dpo_dataset(),
                       processing_class=tok)


def test_sft_label_smoothing_options(tmp_path):
    """``label_smoothing_factor`` reaches a given spec; a conflicting ``fdiv`` value or a primal spec is refused."""
    tok = tiny_tokenizer()
    args = trl.SFTConfig(**_common(tmp_path, "s", max_steps=1, label_smoothing_factor=0.2))
    kw = dict(args=args, train_dataset=sft_dataset(), processing_class=tok)
    tr = FDivSFTTrainer(model=tiny_llama(tok), fdiv=fk.FDivSpec("js", beta=0.5), **kw)
    assert tr.fdiv_options["spec"].label_smoothing == 0.2
    with pytest.raises(ValueError, match="differ"):
        FDivSFTTrainer(model=tiny_llama(tok), fdiv={"label_smoothing": 0.1}, **kw)
    with pytest.raises(ValueError, match="PrimalSpec"):
        FDivSFTTrainer(model=tiny_llama(tok), fdiv=fk.PrimalSpec("kl"), **kw)


def test_sft_kl_is_log_mean_exp_and_divided_by_accumulation_steps(tmp_path):
    """KL has no token-sum form: with num_items_in_batch it stays a per-call mean, divided by the GA steps."""
    tok = tiny_tokenizer()
    tr = FDivSFTTrainer(model=tiny_llama(tok), args=trl.SFTConfig(**_common(tmp_path, "k", max_steps=1)),
                        train_dataset=sft_dataset(), processing_class=tok, fdiv={"divergence": "kl"})
    batch = next(iter(tr.get_train_dataloader()))
    base = tr.compute_loss(tr.model, dict(batch))
    with torch.no_grad():
        z = tr.model.forward.__wrapped__(tr.model, input_ids=batch["input_ids"],
                                         attention_mask=batch["attention_mask"]).logits.double()
    y = batch["labels"][:, 1:]
    m = y != -100
    logp = torch.log_softmax(z[:, :-1], -1).gather(-1, y.clamp(min=0)[..., None]).squeeze(-1)[m]
    expect = torch.logsumexp(-logp - 1, 0) - math.log(logp.numel())  # log mean exp(-u - 1), u = logp
    assert abs(base.item() - expect.item()) < 1e-5
    tr.current_gradient_accumulation_steps = 2
    halved = tr.compute_loss(tr.model, dict(batch), num_items_in_batch=torch.tensor(999))
    assert torch.allclose(halved, base / 2, atol=1e-6)


def test_dpo_ipo_with_an_f_divergence_is_refused(tmp_path):
    """TRL's IPO divides the f-divergence scores of summed log-ratios by the length; the fused loss
    length-normalises the log-probs: equal for reverse_kl only, so the other scores are refused."""
    tok = tiny_tokenizer()
    model = tiny_llama(tok)
    args = trl.DPOConfig(**_common(tmp_path, "i", max_steps=1, loss_type=["ipo"], f_divergence_type="js_divergence"))
    with pytest.raises(NotImplementedError, match="ipo"):
        FDivDPOTrainer(model=model, ref_model=copy.deepcopy(model), args=args, train_dataset=dpo_dataset(),
                       processing_class=tok)


def test_dpo_evaluation_step_equals_trl(tmp_path):
    """prediction_step runs the loss under no_grad (the fused DPO module's whole-batch path) and,
    without prediction_loss_only, returns the model's logits as TRL does."""
    tok = tiny_tokenizer()
    model, ds = tiny_llama(tok), dpo_dataset()
    ref_model = tiny_llama(tok, seed=1)
    args = lambda name: trl.DPOConfig(**_common(tmp_path, name, max_steps=1, beta=0.1))  # noqa: E731
    theirs = trl.DPOTrainer(model=copy.deepcopy(model), ref_model=copy.deepcopy(ref_model), args=args("a"),
                            train_dataset=ds, processing_class=tok)
    ours = FDivDPOTrainer(model=model, ref_model=ref_model, args=args("b"), train_dataset=ds, processing_class=tok)
    batch = next(iter(ours.get_train_dataloader()))
    la, logits_a, _ = theirs.prediction_step(theirs.model, dict(batch), prediction_loss_only=False)
    lb, logits_b, _ = ours.prediction_step(ours.model, dict(batch), prediction_loss_only=False)
    assert torch.allclose(la, lb, atol=1e-5, rtol=1e-5), (la, lb)
    assert logits_b is not None and torch.allclose(logits_a, logits_b, atol=1e-5)


# ------------------------------------------------------------------------------------------
# FDivGKDTrainer (TRL's experimental GKDTrainer with the fused distillation loss)
# ------------------------------------------------------------------------------------------

CHAT = ("{% for m in messages %}{{ m['content'] }}{% if not loop.last %} {% endif %}{% endfor %}"
        "{% if add_generation_prompt %} {% endif %}")


def _gkd_trainers(tmp_path, *, beta=0.5, distill=None, lmbda=0.0, steps=2):
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from fdiv_kernels.integrations.trl import FDivGKDTrainer

    tok = tiny_tokenizer()
    tok.chat_template = CHAT
    student = tiny_llama(tok, seed=0)
    teacher = _tiny.tiny_llama(tok, hidden_size=48, seed=1)  # another width: H_t != H_s
    with torch.no_grad():
        teacher.lm_head.weight.mul_(20)
    ds = datasets.Dataset.from_dict({"messages": [[{"role": "user", "content": "the cat"},
                                                   {"role": "assistant", "content": "sat on the mat"}],
                                                  [{"role": "user", "content": "a dog"},
                                                   {"role": "assistant", "content": "ran fast"}]] * 4})

    def cfg(name):
        return GKDConfig(**_common(tmp_path, name, max_steps=steps), lmbda=lmbda, beta=beta, max_length=32,
                         max_new_tokens=4)

    theirs = GKDTrainer(model=copy.deepcopy(student), teacher_model=copy.deepcopy(teacher), args=cfg("a"),
                        train_dataset=ds, processing_class=tok)
    ours = FDivGKDTrainer(model=student, teacher_model=teacher, args=cfg("b"), train_dataset=ds, processing_class=tok,
                          distill=distill, backend="torch")
    return theirs, ours, tok


def _gkd_batch(tok, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, len(tok), (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[2, -3:] = 0
    ids[2, -3:] = tok.pad_token_id
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :3] = -100  # the prompt
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize("beta", [0.5, 0.0, 1.0, 0.2])
def test_gkd_equals_trl_generalized_jsd(tmp_path, beta):
    """The default loss (js with GKDConfig.beta) is TRL's GKD loss: values (mean, and sum over
    num_items_in_batch) and the student's gradients; no gradient reaches the teacher."""
    theirs, ours, tok = _gkd_trainers(tmp_path, beta=beta)
    batch = _gkd_batch(tok)
    for n in (None, torch.tensor(11)):
        for tr in (theirs, ours):
            tr.model.zero_grad(set_to_none=True)
        a = theirs.compute_loss(theirs.model, dict(batch), num_items_in_batch=n)
        b = ours.compute_loss(ours.model, dict(batch), num_items_in_batch=n)
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), (a, b)
        a.backward()
        b.backward()
        for (name, pa), (_, pb) in zip(theirs.model.named_parameters(), ours.model.named_parameters()):
            assert torch.allclose(pa.grad, pb.grad, rtol=1e-4, atol=1e-6), name
    assert all(p.grad is None for p in ours.teacher_model.parameters())


def test_gkd_any_divergence_matches_the_formula(tmp_path):
    """distill={"divergence": "alpha", ...} against the float64 oracle on both models' full logits."""
    import oracle

    opts = {"divergence": "alpha", "alpha": 1.5, "temperature": 2.0, "hard_label_weight": 0.3}
    _, ours, tok = _gkd_trainers(tmp_path, distill=opts)
    batch = _gkd_batch(tok, seed=1)
    got = ours.compute_loss(ours.model, dict(batch))
    with torch.no_grad():
        zs = ours.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        zt = ours.teacher_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    want = oracle.distill_loss(zt.double(), zs.double(), batch["labels"][:, 1:], **opts)
    assert abs(float(got) - float(want)) < 1e-5 * max(1.0, abs(float(want))), (float(got), float(want))


def test_gkd_trains_on_policy(tmp_path):
    """lmbda=1: every step generates with the student (TRL's generation, unchanged), then the fused loss."""
    _, ours, _ = _gkd_trainers(tmp_path, lmbda=1.0, distill={"divergence": "squared_hellinger"}, steps=2)
    ours.train()
    losses = _losses(ours)
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses), losses
