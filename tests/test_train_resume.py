"""A run interrupted after a checkpoint and resumed ends with the same weights as an uninterrupted one."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from fdiv_kernels.train import checkpoint as ckpt
from fdiv_kernels.train.pipeline import run_command
from train_configs import tiny_run


def _cfg(out, name):
    return tiny_run(out, name, seed=3, data={"synthetic": {"n_sft": 24, "n_pref": 16, "n_eval": 8, "n_pretrain": 8}},
                    sft={"steps": 6, "batch_size": 4, "lr": 1e-2, "warmup_steps": 2, "divergence": "pearson",
                         "beta": 0.5, "save_every": 3, "eval_every": 0})


class Crash(RuntimeError):
    pass


def test_resume_matches_uninterrupted_run(tmp_path, monkeypatch):
    run_command(_cfg(tmp_path, "straight"), "sft")

    real_save = ckpt.save_checkpoint

    def save_then_crash(phase_dir, *, step, **kw):
        out = real_save(phase_dir, step=step, **kw)
        if step == 3:
            raise Crash("simulated interruption after the step-3 checkpoint")
        return out

    monkeypatch.setattr(ckpt, "save_checkpoint", save_then_crash)
    with pytest.raises(Crash):
        run_command(_cfg(tmp_path, "resumed"), "sft")
    monkeypatch.setattr(ckpt, "save_checkpoint", real_save)
    run_dir = tmp_path / "resumed"
    assert not (run_dir / "sft" / "final").exists()
    assert ckpt.latest_checkpoint(str(run_dir / "sft")).endswith("checkpoint-3")
    state = ckpt.load_trainer_state(str(run_dir / "sft" / "checkpoint-3"))  # weights_only=True load
    assert state["step"] == 3 and "exp_avg" in str(state["optimizer"]["state"][0].keys())

    run_command(_cfg(tmp_path, "resumed"), "sft", resume=True)
    a = load_file(str(tmp_path / "straight" / "sft" / "final" / "model.safetensors"))
    b = load_file(str(run_dir / "sft" / "final" / "model.safetensors"))
    start = load_file(str(run_dir / "sft" / "checkpoint-3" / "model.safetensors"))
    assert a.keys() == b.keys()
    moved = max(float((a[k] - start[k]).abs().max()) for k in a)
    assert moved > 1e-4  # the last three steps did change the weights
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    assert [r["step"] for r in rows if r.get("phase") == "sft"] == [1, 2, 3, 4, 5, 6]
    straight = [json.loads(line) for line in open(tmp_path / "straight" / "metrics.jsonl")]
    la = [r["loss"] for r in straight if r.get("phase") == "sft"]
    lb = [r["loss"] for r in rows if r.get("phase") == "sft"]
    assert la == pytest.approx(lb, rel=1e-5, abs=1e-7)


def test_checkpoint_files_are_atomic_and_weights_only(tmp_path):
    run_command(_cfg(tmp_path, "ck"), "sft")
    phase = tmp_path / "ck" / "sft"
    names = sorted(os.listdir(phase))
    assert names == ["checkpoint-3", "checkpoint-6", "final"]  # no *.tmp / *.old left behind
    assert {"model.safetensors", "config.json", "trainer_state.pt", "state.json", "tokenizer.json"} <= set(
        os.listdir(phase / "checkpoint-6"))
    state = ckpt.load_trainer_state(str(phase / "checkpoint-6"))  # torch.load(weights_only=True)
    assert state["step"] == 6 and state["scheduler"]["last_epoch"] == 6
    assert isinstance(state["rng"]["torch"], torch.Tensor) and len(state["rng"]["python"][1]) == 625
