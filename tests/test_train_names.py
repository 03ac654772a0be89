"""Models and data by name, as TRL users type them (issue 26, item 10): a Hugging Face Hub model
id and `datasets` data sets (a `save_to_disk` directory, a local data set folder with `:split`)
run the trainer; a Hub id that cannot be resolved, offline, is one line and exit 2.

There is no hub access here, so the Hub model id is served from a Hugging Face cache built in a
temporary HF_HOME (the layout `hf download` leaves) with HF_HUB_OFFLINE=1: transformers resolves
the id through huggingface_hub exactly as after a download. Each command runs in a fresh
interpreter (huggingface_hub reads HF_HOME and HF_HUB_OFFLINE at import), ~10 s each.
"""

import json
import os
import subprocess
import sys

import pytest
import yaml

from train_configs import tiny_run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HUB_MODEL = "fdiv-test/tiny-llama"
TINY = {"backend": "torch", "seed": 1, "num_threads": 1, "progress": False,
        "data": {"max_length": 32, "max_eval_pairs": 8, "synthetic": {"n_sft": 16, "n_pref": 8, "n_eval": 8}},
        "eval": {"task_accuracy": False}, "sft": {"steps": 2, "batch_size": 4, "divergence": "js", "beta": 0.5,
                                                  "eval_every": 0}}


@pytest.fixture(scope="module")
def named(tmp_path_factory):
    """A cached Hub model, a save_to_disk data set, a local parquet data set folder, a config."""
    datasets = pytest.importorskip("datasets")
    from fdiv_kernels.data import load_sft
    from fdiv_kernels.train.modeling import build_tiny_model
    from fdiv_kernels.train.synthetic import generate_dataset
    from fdiv_kernels.train.tokenizer import build_char_tokenizer

    root = tmp_path_factory.mktemp("names")
    tok = build_char_tokenizer()
    model = build_tiny_model(tiny_run(root, "x").model, tok)
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = root / "hf" / "hub" / f"models--{HUB_MODEL.replace('/', '--')}"
    model.save_pretrained(repo / "snapshots" / commit)
    tok.save_pretrained(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)

    syn = generate_dataset(str(root / "syn"), n_sft=16, n_pref=8, n_eval=8, n_pretrain=8, seed=0,
                           tasks=["add", "sort"], pretrain_noise=0.0)
    sft = datasets.Dataset.from_list(load_sft(syn["sft_train"]))
    sft.save_to_disk(str(root / "sft_saved"))
    (root / "chat" / "data").mkdir(parents=True)
    sft.to_parquet(str(root / "chat" / "data" / "train_sft-00000-of-00001.parquet"))
    datasets.Dataset.from_list(load_sft(syn["eval_prompts"])).to_parquet(
        str(root / "chat" / "data" / "test_sft-00000-of-00001.parquet"))
    cfg = root / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    return {"root": root, "config": str(cfg)}


def _train(named, *args):
    env = {**os.environ, "HF_HOME": str(named["root"] / "hf"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(named["root"] / "datasets-cache"), "PYTHONWARNINGS": "ignore"}
    env.pop("HF_TOKEN", None)
    return subprocess.run([sys.executable, "-m", "fdiv_kernels.train", "sft", "--config", named["config"],
                           "--output", str(named["root"] / "runs"), *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)


def test_a_hub_model_id_and_datasets_data_sets_train(named):
    root = named["root"]
    res = _train(named, "--name", "by-name", "--model", HUB_MODEL,
                 "--set", f"data.sft_train={root / 'sft_saved'}", "--set", f"data.eval_prompts={root / 'chat'}:test_sft")
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((root / "runs" / "by-name" / "summary.json").read_text())
    assert summary["model"] == HUB_MODEL and summary["phases"]["sft"]["steps"] == 2
    assert "[sft] divergence=js" in res.stdout and "16 examples" in res.stdout


@pytest.mark.parametrize("args, message", [
    (["--model", "meta-llama/Meta-Llama-3-8B"],
     "fdiv-train: error: model.path 'meta-llama/Meta-Llama-3-8B' is not a local directory, and as a Hugging Face "
     "Hub id: the Hugging Face Hub is unreachable (no network, or HF_HUB_OFFLINE=1)"),
    (["--set", "data.sft_train=HuggingFaceH4/ultrachat_200k:train_sft"],
     "fdiv-train: error: data.sft_train: HuggingFaceH4/ultrachat_200k:train_sft: datasets cannot read it"),
    (["--set", "data.sft_train=HuggingFaceH4/ultrachat_200k"],
     "fdiv-train: error: data.sft_train: HuggingFaceH4/ultrachat_200k: no such file or directory, and a Hugging "
     "Face Hub data set needs a split"),
])
def test_a_name_that_cannot_be_resolved_is_one_line_and_exit_2(named, args, message):
    res = _train(named, "--name", "unresolved", *args)
    assert res.returncode == 2, res.stderr[-3000:]
    err = res.stderr.strip()
    assert err.startswith(message) and err.count("\n") == 0, err
    assert not (named["root"] / "runs" / "unresolved").exists()
