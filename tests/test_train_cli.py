"""CLI smoke runs: a tiny pipeline writes metrics, plots, summary and loadable checkpoints;
``--resume`` of a finished run skips its phases; ``--mix-dpo`` adapts lambda; config errors."""

import json
import os

import pytest
import yaml

from fdiv_kernels.train.cli import main
from fdiv_kernels.train.config import load_config

TINY = {
    "backend": "torch", "seed": 1, "num_threads": 1,
    "model": {"tiny": {"hidden_size": 16, "num_layers": 1, "num_heads": 2, "intermediate_size": 32}},
    "data": {"max_length": 32, "max_eval_pairs": 8, "synthetic": {"n_sft": 24, "n_pref": 16, "n_eval": 8, "n_pretrain": 40}},
    "eval": {"num_prompts": 8, "max_new_tokens": 4},
    "pretrain": {"steps": 2, "batch_size": 4, "seq_length": 32},
    "sft": {"steps": 3, "batch_size": 4, "divergence": "js", "beta": 0.5, "eval_every": 2},
    "dpo": {"steps": 3, "batch_size": 4, "rejected": "self", "eval_every": 2},
}


@pytest.fixture()
def config_file(tmp_path):
    p = tmp_path / "tiny.yaml"
    p.write_text(yaml.safe_dump(TINY))
    return str(p)


def test_pipeline_smoke_writes_everything(tmp_path, config_file, capsys):
    out = str(tmp_path / "runs")
    assert main(["pipeline", "--config", config_file, "--output", out, "--name", "smoke", "--no-progress",
                 "--set", "dpo.beta=0.2"]) == 0
    printed = capsys.readouterr().out
    run = os.path.join(out, "smoke")
    assert "task accuracy" in printed and "base:" in printed and "dpo:" in printed and os.path.join(run, "plots") in printed
    rows = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    phases = {r["phase"] for r in rows}
    assert {"pretrain", "sft", "dpo", "eval"} <= phases
    sft_rows = [r for r in rows if r["phase"] == "sft" and r["step"] > 0]
    for key in ("loss", "nll", "value_s0", "logratio_ref", "grad_norm", "lr", "tokens_per_s"):
        assert all(key in r for r in sft_rows), key
    assert any("align_accuracy" in r and "align_dpo_loss" in r and "kl_ref_heldout" in r for r in sft_rows)
    assert [r["model"] for r in rows if r["phase"] == "eval"] == ["base", "sft", "dpo"]
    dpo_rows = [r for r in rows if r["phase"] == "dpo" and r["step"] > 0]
    assert all("accuracy" in r and "margin" in r for r in dpo_rows)
    summary = json.load(open(os.path.join(run, "summary.json")))
    assert set(summary["task_accuracy"]) == {"base", "sft", "dpo"} and summary["dpo_beta"] == 0.2
    assert all(isinstance(v, dict) for v in summary["phases"].values())  # one mapping per phase, nothing else
    assert 0 <= summary["phases"]["dpo"]["rejected_self"] <= 16
    for f in ("pretrain.png", "sft.png", "dpo.png", "task_accuracy.png"):
        assert os.path.getsize(os.path.join(run, "plots", f)) > 1000
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final = os.path.join(run, "dpo", "final")
    model = AutoModelForCausalLM.from_pretrained(final)
    tok = AutoTokenizer.from_pretrained(final)
    assert model.config.hidden_size == 16 and tok.chat_template and os.path.exists(os.path.join(final, "model.safetensors"))

    # resuming a finished run skips every phase and reproduces the accuracies
    assert main(["pipeline", "--config", config_file, "--output", out, "--name", "smoke", "--no-progress",
                 "--set", "dpo.beta=0.2", "--resume"]) == 0
    assert "already finished" in capsys.readouterr().out
    rows = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    assert [r["model"] for r in rows if r["phase"] == "eval"] == ["base", "sft", "dpo"]  # re-graded, not duplicated
    assert len([r for r in rows if r["phase"] == "sft" and r["step"] > 0]) == len(sft_rows)
    again = json.load(open(os.path.join(run, "summary.json")))
    assert again["task_accuracy"] == summary["task_accuracy"]
    assert all(again["phases"][p].get("skipped") for p in ("pretrain", "sft", "dpo"))

    # the dpo command from a saved checkpoint (local HF dir + its tokenizer), SimPO, no reference model
    assert main(["dpo", "--config", config_file, "--output", out, "--name", "simpo", "--no-progress",
                 "--model", os.path.join(run, "sft", "final"), "--loss-type", "simpo", "--beta", "2", "--gamma", "1",
                 "--steps", "2", "--set", "dpo.rejected=data"]) == 0
    s2 = json.load(open(os.path.join(out, "simpo", "summary.json")))
    assert s2["dpo_kind"] == "simpo" and set(s2["task_accuracy"]) == {"start", "dpo"}
    assert s2["model"].endswith(os.path.join("sft", "final"))


def test_mix_dpo_sft_logs_an_adaptive_lambda(tmp_path, config_file):
    out = str(tmp_path / "runs")
    assert main(["sft", "--config", config_file, "--output", out, "--name", "mix", "--no-progress", "--mix-dpo",
                 "--steps", "4", "--lr", "1e-2", "--set", "sft.mix_dpo.target_accuracy=0.5",
                 "--set", "eval.task_accuracy=false"]) == 0
    rows = [json.loads(line) for line in open(os.path.join(out, "mix", "metrics.jsonl"))]
    sft = [r for r in rows if r["phase"] == "sft" and r["step"] > 0]
    assert len(sft) == 4
    lam = [r["mix_lambda"] for r in sft]
    acc = [r["mix_dpo_accuracy"] for r in sft]
    assert lam[0] == 1.0
    for i in range(3):  # halve above the target accuracy, double otherwise
        assert lam[i + 1] == (lam[i] / 2 if acc[i] > 0.5 else lam[i] * 2)


def test_config_errors_and_flag_mapping(tmp_path, config_file, capsys):
    assert main(["sft", "--config", config_file, "--set", "sft.lrr=1"]) == 2
    assert "unknown config key 'sft.lrr'" in capsys.readouterr().err
    assert main(["pipeline", "--config", config_file, "--lr", "1e-4"]) == 2
    assert "--lr is ambiguous; use --set sft.lr=0.0001 or --set dpo.lr=0.0001" in capsys.readouterr().err
    from fdiv_kernels.train.cli import build_parser, overrides_from_args

    args = build_parser().parse_args(["dpo", "--lr", "5e-7", "--beta", "0.01", "--loss-type", "ipo", "--steps", "7"])
    cfg = load_config(config_file, overrides_from_args(args))
    assert (cfg.dpo.lr, cfg.dpo.beta, cfg.dpo.loss_type, cfg.dpo.steps) == (5e-7, 0.01, "ipo", 7)
    assert cfg.sft.beta == 0.5  # untouched


@pytest.mark.parametrize("name", ["demo.yaml", "llama3_8b_sft_lr5e-6.yaml", "llama3_8b_dpo.yaml", "llama3_8b_simpo.yaml",
                                  "mistral_7b_sft_lr1e-6.yaml"])
def test_example_configs_parse(name):
    path = os.path.join(os.path.dirname(__file__), "..", "examples", "configs", name)
    cfg = load_config(path)
    if name.startswith("llama3_8b_dpo"):
        assert (cfg.dpo.beta, cfg.dpo.lr, cfg.dpo.batch_size) == (0.01, 5e-7, 128)
    if "simpo" in name:
        assert (cfg.dpo.loss_type, cfg.dpo.beta, cfg.dpo.gamma, cfg.dpo.lr) == ("simpo", 2.0, 1.0, 6e-7)
    if name != "demo.yaml":  # the paper's models and data sets as a TRL user names them (Hub id, id:split)
        from fdiv_kernels.hf import hub_id

        assert hub_id(cfg.model.path) or name.startswith(("llama3_8b_dpo", "llama3_8b_simpo")), cfg.model.path
        assert cfg.data.sft_train == "HuggingFaceH4/ultrachat_200k:train_sft"
        assert cfg.data.eval_pref == "HuggingFaceH4/ultrafeedback_binarized:test_prefs"


def test_local_rank_from_the_deepspeed_launcher(monkeypatch, config_file):
    """`deepspeed --module fdiv_kernels.train ...` passes --local_rank=N before the command, a
    script launch after it; both are accepted and fill LOCAL_RANK."""
    from fdiv_kernels.train.cli import build_parser

    for argv in (["--local_rank=1", "sft"], ["sft", "--local_rank=1"], ["pipeline", "--local-rank", "1"]):
        assert build_parser().parse_args(argv).local_rank == 1
    assert getattr(build_parser().parse_args(["sft"]), "local_rank", None) is None
    monkeypatch.setenv("LOCAL_RANK", "0")  # recorded, so that teardown removes what main() sets (no leak into
    monkeypatch.delenv("LOCAL_RANK")       # later tests: accelerate reads LOCAL_RANK as a distributed launch)
    assert main(["--local_rank=3", "sft", "--config", config_file, "--set", "sft.lrr=1"]) == 2  # stops at the config
    assert os.environ["LOCAL_RANK"] == "3"


def test_demo_keeps_enough_checkpoints_for_a_value_curve():
    """README's `fdiv-analyze values --phase-dir runs/demo/sft` needs several checkpoints per phase."""
    cfg = load_config("demo")
    for phase in (cfg.sft, cfg.dpo):
        n = phase.steps // phase.save_every
        assert n >= 4 and (phase.keep_checkpoints == 0 or phase.keep_checkpoints >= n)


def test_named_configs_resolve_in_the_source_tree():
    from fdiv_kernels.train.config import resolve_config, shipped_configs

    assert {"demo.yaml", "zero2.json", "zero3.json"} <= set(shipped_configs())
    assert resolve_config("demo").endswith(os.path.join("configs", "demo.yaml"))
    assert resolve_config("zero3.json").endswith("zero3.json")
    with pytest.raises(ValueError, match="no shipped config of that name"):
        resolve_config("nope")
