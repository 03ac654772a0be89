"""A run interrupted after a checkpoint and resumed ends with the same weights as an uninterrupted one."""

import json
import os

import pytest
import torch

from fdiv_kernels import runs
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
    assert runs.latest_checkpoint(str(run_dir / "sft")).endswith("checkpoint-3")
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


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    run_command(_cfg(out, "straight"), "sft")
    return out / "straight"


def _damage(path, how):
    data = bytearray(open(path, "rb").read())
    if how == "truncate":
        data = data[: len(data) // 2]
    else:  # garbage bytes in the tensor data, the header left intact: loads, but wrong
        mid = len(data) - 64
        data[mid: mid + 16] = bytes(range(16))
    open(path, "wb").write(bytes(data))


@pytest.mark.parametrize("file,how", [("model.safetensors", "truncate"), ("model.safetensors", "garbage"),
                                      ("trainer_state.pt", "truncate")])
def test_resume_falls_back_from_a_damaged_checkpoint(straight, tmp_path, capsys, file, how):
    """A crash after checkpoint-6 was written, then checkpoint-6 damaged: the resume says so,
    continues from checkpoint-3, and ends with the uninterrupted run's weights."""
    import shutil

    run = tmp_path / "straight"
    shutil.copytree(straight, run)
    shutil.rmtree(run / "sft" / "final")
    os.remove(run / "summary.json")
    _damage(str(run / "sft" / "checkpoint-6" / file), how)
    assert ckpt.checkpoint_problem(str(run / "sft" / "checkpoint-6")) is not None
    capsys.readouterr()
    summary = run_command(_cfg(tmp_path, "straight"), "sft", resume=True)
    out = capsys.readouterr().out
    assert f"checkpoint-6 cannot be resumed from: {file}" in out and "falling back" in out
    assert summary["phases"]["sft"]["resumed_from"] == 3
    a = load_file(str(straight / "sft" / "final" / "model.safetensors"))
    b = load_file(str(run / "sft" / "final" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_a_damaged_final_is_not_taken_for_a_finished_phase(straight, tmp_path, capsys):
    import shutil

    run = tmp_path / "straight"
    shutil.copytree(straight, run)
    _damage(str(run / "sft" / "final" / "model.safetensors"), "garbage")
    run_command(_cfg(tmp_path, "straight"), "sft", resume=True)
    out = capsys.readouterr().out
    assert "final is not a complete result (model.safetensors does not match its checksum)" in out
    a = load_file(str(straight / "sft" / "final" / "model.safetensors"))
    b = load_file(str(run / "sft" / "final" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # rebuilt from checkpoint-6, not the damaged file


def test_sigint_saves_a_checkpoint_prints_the_resume_command_and_resumes_exactly(straight, tmp_path, capsys,
                                                                                 monkeypatch):
    import signal

    import yaml

    from fdiv_kernels.train import phases
    from fdiv_kernels.train.cli import main

    cfg = tmp_path / "cfg.yaml"
    from fdiv_kernels.train.config import to_dict

    d = to_dict(_cfg(tmp_path, "x"))
    d.pop("name"), d.pop("output_dir")
    d["sft"]["save_every"] = 0  # no periodic checkpoint: the one at step 4 comes from the interrupt
    cfg.write_text(yaml.safe_dump(d))
    argv = ["sft", "--config", str(cfg), "--output", str(tmp_path / "runs"), "--name", "int"]
    calls = {"n": 0}
    real_micro = phases.SFTPhase.micro

    def ctrl_c_in_step_4(self, module, batch, norm):  # one micro-batch per step
        calls["n"] += 1
        if calls["n"] == 4:
            os.kill(os.getpid(), signal.SIGINT)  # as a terminal's Ctrl-C would, mid-step
        return real_micro(self, module, batch, norm)

    monkeypatch.setattr(phases.SFTPhase, "micro", ctrl_c_in_step_4)
    assert main(argv) == 130
    err = capsys.readouterr().err.strip().splitlines()
    run = tmp_path / "runs" / "int"
    assert err[-1] == (f"fdiv-train: interrupted in sft at step 4; checkpoint saved to {run}/sft/checkpoint-4; "
                       f"resume with: fdiv-train sft --config {cfg} --output {tmp_path / 'runs'} --name int --resume")
    assert sorted(os.listdir(run / "sft")) == ["checkpoint-4"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored
    monkeypatch.setattr(phases.SFTPhase, "micro", real_micro)
    assert main(argv + ["--resume"]) == 0
    a = load_file(str(straight / "sft" / "final" / "model.safetensors"))
    b = load_file(str(run / "sft" / "final" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    steps = [r["step"] for r in map(json.loads, open(run / "metrics.jsonl")) if r.get("phase") == "sft"]
    assert steps == [1, 2, 3, 4, 5, 6]
