"""--report-to: the metrics of metrics.jsonl also reach TensorBoard (read back from its event
files) and Weights & Biases (a stand-in ``wandb`` module records the calls; no account needed)."""

import json
import os
import sys
import types

import pytest

from fdiv_kernels.train.cli import main
from fdiv_kernels.train.config import load_config
from fdiv_kernels.errors import ConfigError
from fdiv_kernels.train.pipeline import run_command
from train_configs import tiny_run


def _cfg(out, name, report_to):
    return tiny_run(out, name, report_to=report_to,
                    sft={"steps": 3, "batch_size": 4, "lr": 1e-2, "divergence": "js", "beta": 0.5, "eval_every": 2})


def _rows(run_dir):
    return [r for r in map(json.loads, open(os.path.join(run_dir, "metrics.jsonl"))) if r.get("phase") == "sft" and "loss" in r]


def test_tensorboard_holds_the_logged_metrics(tmp_path, capsys):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    summary = run_command(_cfg(tmp_path, "tb", ["tensorboard"]), "sft")
    folder = str(tmp_path / "tb" / "tensorboard")
    assert summary["tensorboard"] == folder  # the summary names the folder
    assert f"tensorboard: {folder}  (tensorboard --logdir {folder})" in capsys.readouterr().out
    acc = EventAccumulator(str(tmp_path / "tb" / "tensorboard"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"sft/loss", "sft/nll", "sft/grad_norm", "sft/align_accuracy"} <= set(tags)
    want = {r["step"]: r["loss"] for r in _rows(tmp_path / "tb")}
    got = {e.step: e.value for e in acc.Scalars("sft/loss")}
    assert got.keys() == want.keys() == {1, 2, 3}
    assert all(got[k] == pytest.approx(want[k], rel=1e-6) for k in want)


def test_wandb_gets_every_record_on_its_phase_axis(tmp_path, monkeypatch):
    calls = {"init": [], "log": [], "define": [], "finish": 0}

    class Run:
        def finish(self):
            calls["finish"] += 1

    fake = types.SimpleNamespace(
        init=lambda **kw: calls["init"].append(kw) or Run(),
        log=lambda d: calls["log"].append(d),
        define_metric=lambda name, **kw: calls["define"].append((name, kw)),
        __spec__=types.SimpleNamespace(name="wandb"))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    import importlib.util

    real_find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: fake.__spec__ if n == "wandb" else real_find(n, *a))
    run_command(_cfg(tmp_path, "wb", ["wandb"]), "sft")
    (init,) = calls["init"]
    assert init["name"] == "wb" and init["dir"] == str(tmp_path / "wb") and init["config"]["sft"]["beta"] == 0.5
    assert ("sft/*", {"step_metric": "sft/step"}) in calls["define"]
    logged = [d for d in calls["log"] if "sft/loss" in d]
    assert [d["sft/step"] for d in logged] == [1, 2, 3]
    assert [d["sft/loss"] for d in logged] == pytest.approx([r["loss"] for r in _rows(tmp_path / "wb")])
    assert calls["finish"] == 1


def test_report_to_is_validated_first(tmp_path, capsys, monkeypatch):
    with pytest.raises(ConfigError, match="unknown reporter 'mlflow'"):
        run_command(_cfg(tmp_path, "x", ["mlflow"]), "sft")
    import importlib.util

    real_find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "wandb" else real_find(n, *a))
    assert main(["sft", "--report-to", "wandb", "--output", str(tmp_path), "--name", "y"]) == 2
    assert "report_to wandb needs the wandb package: pip install 'fdiv-kernels[wandb]'" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()
    cfg = load_config(None, ["report_to=[tensorboard, wandb]"])
    assert cfg.report_to == ["tensorboard", "wandb"] and load_config(None).report_to == []
