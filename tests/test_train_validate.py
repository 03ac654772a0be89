"""Bad input stops a run before anything is deleted, loaded or evaluated: one line, exit 2.

A finished run is re-run with a typo of each kind: its results stay as they were, the error
names the problem, and no model is ever built (``base_model`` would raise). Then: a re-run
without ``--resume`` / ``--overwrite`` is refused; ``--overwrite`` replaces; ``--resume`` with a
changed configuration is refused unless ``--allow-config-change``.
"""

import hashlib
import json
import os

import pytest
import yaml

from fdiv_kernels.train import pipeline
from fdiv_kernels.train.cli import main
from fdiv_kernels.errors import ConfigError, DataError, ResumeMismatchError, RunDirectoryError

TINY = {
    "backend": "torch", "seed": 1, "num_threads": 1, "progress": False,
    "model": {"tiny": {"hidden_size": 16, "num_layers": 1, "num_heads": 2, "intermediate_size": 32}},
    "data": {"max_length": 32, "max_eval_pairs": 8, "synthetic": {"n_sft": 16, "n_pref": 8, "n_eval": 8}},
    "eval": {"task_accuracy": False},
    "sft": {"steps": 2, "batch_size": 4, "divergence": "js", "beta": 0.5, "eval_every": 0},
    "dpo": {"steps": 2, "batch_size": 4, "eval_every": 0},
}


def _digest(run_dir):
    """Hash of every file under run_dir (paths and bytes)."""
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(run_dir)):
        for f in sorted(files):
            p = os.path.join(root, f)
            h.update(os.path.relpath(p, run_dir).encode())
            with open(p, "rb") as fh:
                h.update(fh.read())
    return h.hexdigest()


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    root = tmp_path_factory.mktemp("validate")
    cfg = root / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    out = root / "runs"
    assert main(["pipeline", "--config", str(cfg), "--output", str(out), "--name", "run"]) == 0
    return {"config": str(cfg), "out": str(out), "run": out / "run", "root": root}


@pytest.fixture()
def no_model(monkeypatch):
    """Fail the test if a model is built or loaded."""
    def refuse(*a, **k):
        raise AssertionError("a model was built before the configuration was checked")

    monkeypatch.setattr(pipeline, "base_model", refuse)
    monkeypatch.setattr(pipeline, "load_model", refuse)


def _bad_jsonl(root):
    p = root / "bad_sft.jsonl"
    good = {"messages": [{"role": "user", "content": "add 1+2"}, {"role": "assistant", "content": "3"}]}
    p.write_text(json.dumps(good) + "\n" + '{"messages": [oops\n')
    return str(p)


def _broken_yaml(root):
    p = root / "broken.yaml"
    p.write_text("sft:\n  lr: 1e-3\n   beta: 2\n")
    return str(p)


TYPOS = {
    "beta": (["sft", "--beta", "-1"], "sft: beta must be"),
    "divergence": (["sft", "--divergence", "foo"], "sft: unknown divergence 'foo'; known:"),
    "model": (["sft", "--model", "/nope"], "model.path '/nope' is not a directory"),
    "lr": (["pipeline", "--set", "sft.lr=-1"], "sft.lr must be a finite number > 0, got -1.0"),
    "dpo loss type": (["dpo", "--loss-type", "simpo2"], "dpo: loss_type='simpo2' is not supported"),
    "backend": (["sft", "--backend", "fortran"], "backend: unknown backend 'fortran'"),
    "batch": (["sft", "--set", "sft.micro_batch_size=3"], "sft: per-process batch 4 must be divisible by "
                                                            "micro_batch_size 3"),
    "unknown key": (["sft", "--set", "sft.lrr=1"], "unknown config key 'sft.lrr'"),
    "deepspeed": (["sft", "--deepspeed", "zero9"], "deepspeed config 'zero9': no such file"),
    "jsonl": (["sft", "--set", "data.sft_train=BAD"], "data.sft_train: .*bad_sft.jsonl:2: invalid JSON"),
    "yaml": (["sft", "--config", "BROKEN"], r"broken.yaml:3:\d+: invalid YAML"),
}


@pytest.mark.parametrize("typo", sorted(TYPOS))
def test_a_rerun_with_a_typo_keeps_the_run_and_exits_2_before_any_model(finished, no_model, capsys, typo):
    before = _digest(finished["run"])
    args, msg = TYPOS[typo]
    args = [a.replace("BAD", _bad_jsonl(finished["root"])).replace("BROKEN", _broken_yaml(finished["root"]))
            for a in args]
    if "--config" not in args:
        args += ["--config", finished["config"]]
    assert main(args + ["--output", finished["out"], "--name", "run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("fdiv-train: error: "), err
    import re

    assert re.search(msg, err), err
    assert _digest(finished["run"]) == before  # final/, plots, summary.json untouched
    assert (finished["run"] / "dpo" / "final" / "model.safetensors").exists()


def test_resume_of_a_run_that_does_not_exist_exits_2(finished, no_model, capsys):
    """A typo in --name with --resume: one line naming the missing run and the runs there, no training
    from scratch (issue 26, item 8)."""
    assert main(["pipeline", "--config", finished["config"], "--output", finished["out"], "--name", "rnu",
                 "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("fdiv-train: error: --resume: nothing to resume in "), err
    assert f"runs in {finished['out']}: run)" in err and "without --resume" in err, err
    assert not os.path.exists(os.path.join(finished["out"], "rnu"))


def test_a_finished_run_is_never_cleared_without_overwrite(finished, capsys, monkeypatch):
    before = _digest(finished["run"])
    base = ["pipeline", "--config", finished["config"], "--output", finished["out"], "--name", "run"]
    with monkeypatch.context() as m:
        m.setattr(pipeline, "base_model", lambda *a: (_ for _ in ()).throw(AssertionError("model built")))
        assert main(base) == 2
    err = capsys.readouterr().err
    assert "holds a finished run (summary.json" in err and "--resume" in err and "--overwrite" in err
    assert _digest(finished["run"]) == before
    # the Python API refuses the same way, with a typed error
    from fdiv_kernels.train.config import load_config

    cfg = load_config(finished["config"], [f"output_dir={finished['out']}", "name=run"])
    with pytest.raises(RunDirectoryError):
        pipeline.run_command(cfg, "pipeline")
    assert issubclass(RunDirectoryError, ConfigError) and issubclass(DataError, ValueError)


def test_resume_refuses_a_changed_configuration_unless_allowed(finished, capsys, tmp_path):
    import shutil

    out = tmp_path / "runs"
    shutil.copytree(finished["run"], out / "run")
    base = ["pipeline", "--config", finished["config"], "--output", str(out), "--name", "run", "--resume"]
    before = _digest(out / "run")
    assert main(base + ["--set", "sft.lr=0.002", "--set", "dpo.loss_type=ipo"]) == 2
    err = capsys.readouterr().err
    assert "--resume with a configuration that differs" in err and "sft.lr: 0.001 -> 0.002" in err
    assert 'dpo.loss_type: "sigmoid" -> "ipo"' in err and "--allow-config-change" in err
    assert _digest(out / "run") == before
    assert main(base + ["--no-progress"]) == 0  # progress (like name, output_dir, threads) may change
    assert main(base + ["--set", "dpo.beta=0.2", "--allow-config-change"]) == 0
    hist = [json.loads(line) for line in open(out / "run" / "config-history.jsonl")]
    assert hist[-1]["changes"] == ["dpo.beta: 0.1 -> 0.2"]
    assert json.load(open(out / "run" / "config.json"))["dpo"]["beta"] == 0.2
    assert issubclass(ResumeMismatchError, ConfigError)


def test_overwrite_replaces_the_run(finished, tmp_path):
    import shutil

    out = tmp_path / "runs"
    shutil.copytree(finished["run"], out / "run")
    (out / "run" / "sft" / "checkpoint-99").mkdir()
    assert main(["sft", "--config", finished["config"], "--output", str(out), "--name", "run", "--overwrite"]) == 0
    assert not (out / "run" / "sft" / "checkpoint-99").exists() and not (out / "run" / "dpo").exists()
    assert json.load(open(out / "run" / "summary.json"))["command"] == "sft"
    assert main(["sft", "--config", finished["config"], "--output", str(out), "--name", "run", "--overwrite",
                 "--resume"]) == 2


def test_version_on_both_clis(capsys):
    import fdiv_kernels
    from fdiv_kernels.analysis.cli import main as analyze

    for cli, prog in ((main, "fdiv-train"), (analyze, "fdiv-analyze")):
        with pytest.raises(SystemExit) as e:
            cli(["--version"])
        assert e.value.code == 0
        assert capsys.readouterr().out.strip() == f"{prog} {fdiv_kernels.__version__}"


def test_keys_added_since_a_run_are_no_change_at_their_defaults():
    """A run written before a config key existed resumes without --allow-config-change while the key
    keeps its default (the old run used it); a non-default value is a change."""
    from fdiv_kernels.train.config import RunConfig, to_dict
    from fdiv_kernels.train.validate import config_changes

    old = to_dict(RunConfig())
    del old["eval"]["align_batch_size"], old["dpo"]["rejected_batch_size"]
    assert config_changes(old, to_dict(RunConfig())) == []
    new = RunConfig()
    new.eval.align_batch_size = 32
    assert config_changes(old, to_dict(new)) == ['eval.align_batch_size: "<absent>" -> 32']
    gone = to_dict(RunConfig())
    gone["sft"]["old_key"] = 1  # a key the new version dropped still shows
    assert config_changes(gone, to_dict(RunConfig())) == ['sft.old_key: 1 -> "<absent>"']


def test_the_former_dpo_kind_key_is_an_unknown_key():
    """``dpo.kind`` was renamed ``dpo.loss_type`` before 1.0 (no alias): a one-line config error."""
    from fdiv_kernels.train.config import from_dict

    with pytest.raises(ConfigError, match="kind"):
        from_dict({"dpo": {"kind": "ipo", "beta": 0.2}})
