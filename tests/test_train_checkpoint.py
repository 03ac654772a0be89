"""Checkpoint saves are verified; the ZeRO-3/FSDP2 hand-over rebuilds a plain model with ties intact."""

import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from fdiv_kernels.errors import CheckpointError
from fdiv_kernels.runs import list_checkpoints
from fdiv_kernels.train import checkpoint as ckpt
from fdiv_kernels.train.config import ModelConfig, TinyModelConfig
from fdiv_kernels.train.modeling import build_tiny_model, enable_checkpointing, rebuild_plain, tensor_aliases
from fdiv_kernels.train.tokenizer import build_char_tokenizer


def _model(tied=False, seed=0):
    torch.manual_seed(seed)
    tok = build_char_tokenizer()
    cfg = ModelConfig(tiny=TinyModelConfig(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32,
                                           tie_word_embeddings=tied))
    return build_tiny_model(cfg, tok), tok


def _sched(model):
    opt = torch.optim.AdamW(model.parameters())
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)


def test_one_state_dict_serves_every_save(tmp_path):
    """transformers 5 empties the state_dict handed to save_pretrained: the checkpoint and the final
    save of the same step (ZeRO-3 / FSDP2 hand both the one gathered dict) must both be complete."""
    model, tok = _model()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    ckpt.save_checkpoint(str(tmp_path), step=1, model=model, tok=tok, optimizer_state={}, scheduler=_sched(model),
                         state_dict=sd)
    ckpt.save_model(model, tok, str(tmp_path / "final"), state_dict=sd)
    for d in ("checkpoint-1", "final"):
        saved = load_file(str(tmp_path / d / "model.safetensors"))
        assert saved.keys() == model.state_dict().keys()
        assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
    assert len(sd) == len(model.state_dict())  # the caller's dict is left alone


@pytest.mark.parametrize("damage", ["nothing", "missing", "shape"])
def test_an_incomplete_save_fails_loudly(tmp_path, monkeypatch, damage):
    model, tok = _model()
    real = type(model).save_pretrained

    def broken_save(self, out_dir, **kw):
        real(self, out_dir, **kw)
        path = os.path.join(out_dir, "model.safetensors")
        sd = load_file(path)
        if damage == "nothing":
            os.remove(path)
        elif damage == "missing":
            sd.pop("lm_head.weight")
            save_file(sd, path)
        else:
            sd["lm_head.weight"] = sd["lm_head.weight"][:3].contiguous()
            save_file(sd, path)

    monkeypatch.setattr(type(model), "save_pretrained", broken_save)
    msg = {"nothing": "was not written", "missing": r"1 tensor\(s\) missing \(lm_head.weight", "shape": "wrong shape"}
    with pytest.raises(CheckpointError, match=msg[damage]):
        ckpt.save_model(model, tok, str(tmp_path / "final"))
    assert not (tmp_path / "final").exists()  # nothing half-written under the final name
    with pytest.raises(CheckpointError):
        ckpt.save_checkpoint(str(tmp_path), step=1, model=model, tok=tok, optimizer_state={},
                             scheduler=_sched(model))
    assert list_checkpoints(str(tmp_path)) == []


def test_tied_weights_save_and_verify(tmp_path):
    model, tok = _model(tied=True)
    ckpt.save_model(model, tok, str(tmp_path / "final"))  # transformers writes the tied head once
    ckpt.verify_weights(str(tmp_path / "final"), model)
    assert ckpt.final_problem(str(tmp_path / "final"), model) is None


@pytest.mark.filterwarnings("error::FutureWarning")  # transformers' deprecated gradient_checkpointing_* names
@pytest.mark.parametrize("tied", [False, True])
def test_rebuild_plain_holds_the_values_and_keeps_ties(tied):
    model, _ = _model(tied=tied)
    enable_checkpointing(model)  # what model.gradient_checkpointing: true does; the rebuild keeps it
    full = {names[0]: t.detach().clone() + 1.0 for names, t in tensor_aliases(model)}
    plain = rebuild_plain(model, full)
    assert plain is not model and type(plain) is type(model)
    for name, t in list(plain.named_parameters()) + list(plain.named_buffers()):
        assert not t.is_meta, name
    sd, old = plain.state_dict(), model.state_dict()
    for k, v in old.items():
        assert torch.equal(sd[k], v + 1.0), k
    assert (plain.lm_head.weight is plain.model.embed_tokens.weight) == tied
    assert all(p.requires_grad for p in plain.parameters())
    assert plain.is_activation_checkpointing if hasattr(type(plain), "is_activation_checkpointing") \
        else plain.is_gradient_checkpointing
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():  # the rebuilt model computes (rotary buffers and all)
        assert torch.isfinite(plain(ids).logits).all()
