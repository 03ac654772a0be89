"""Every example runs at its tiny size (subprocess, CPU, offline), so the examples cannot rot."""

import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def _run(script, *args, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONWARNINGS": "ignore,always::FutureWarning"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, str(EXAMPLES / script), "--tiny", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert "done" in proc.stdout or "unpatched: True" in proc.stdout, proc.stdout
    # no deprecated transformers / TRL / torch API on the examples' path (a user copies them)
    assert "FutureWarning" not in proc.stderr, proc.stderr[-3000:]
    return proc.stdout


def _pair(pattern, text):
    m = re.search(pattern, text)
    assert m, text
    return float(m.group(1)), float(m.group(2))


def test_plain_pytorch_sft_matches_cross_entropy_and_js_runs():
    """`--divergence sft` is the cross-entropy (beta 1 by default; beta times it with --beta)."""
    for beta in ([], ["--beta", "0.5"]):
        out = _run("plain_pytorch.py", "--steps", "2", "--divergence", "sft", *beta)
        fused, naive = _pair(r"fused ([-\d.]+) vs naive cross-entropy ([-\d.]+)", out)
        assert abs(fused - naive) < 1e-5, out
    out = _run("plain_pytorch.py", "--steps", "3", "--divergence", "js")
    assert out.count("step ") == 3


def test_hf_patch():
    out = _run("hf_patch.py", "--steps", "2")
    hf, fused = _pair(r"HF loss ([-\d.]+), fused sft loss ([-\d.]+)", out)
    assert abs(hf - fused) < 1e-5
    assert "logits=None" in out and "generate:" in out and "unpatched: True" in out


def test_trl_sft():
    out = _run("trl_sft.py", "--steps", "2", "--divergence", "pearson", "--beta", "0.5")
    assert "done: 2 steps" in out


def test_trl_dpo():
    out = _run("trl_dpo.py", "--steps", "2", "--loss-type", "ipo")
    first, last = _pair(r"first loss ([-\d.]+), last loss ([-\d.]+)", out)
    assert abs(first - 25.0) < 1e-3  # IPO at pi = pi_ref: (0 - 1/(2*0.1))**2


def test_hf_patch_memory():
    out = _run("hf_patch_memory.py")
    m = re.search(r"hf: loss ([\d.]+).*fused: loss ([\d.]+)", out, re.S)
    assert m and abs(float(m.group(1)) - float(m.group(2))) < 1e-5, out


def test_one_deepspeed_zero3_config_serves_hf_and_the_trainer():
    """examples/configs/zero3.json is the only ZeRO-3 config: its batch sizes and clipping are "auto"
    (HF's TrainingArguments fill them in, and so does fdiv-train), and HF's integration accepts it."""
    assert not list(EXAMPLES.glob("*zero3*.json"))  # no second copy at the top level
    cfg = json.loads((EXAMPLES / "configs" / "zero3.json").read_text())
    assert cfg["zero_optimization"]["stage"] == 3
    assert cfg["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping",
                "train_batch_size"):
        assert cfg[key] == "auto"
    hf_ds = pytest.importorskip("transformers.integrations.deepspeed")
    args = types.SimpleNamespace(
        world_size=2, per_device_train_batch_size=4, gradient_accumulation_steps=3, max_grad_norm=0.5,
        learning_rate=1e-4, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, weight_decay=0.0,
        bf16=True, bf16_full_eval=False, fp16=False, fp16_full_eval=False, fp16_backend="auto", fp16_opt_level="O1",
        optim="adamw_torch", lr_scheduler_type="linear", warmup_steps=0, eval_strategy="no", do_eval=False,
        half_precision_backend="auto", save_on_each_node=False, deepspeed_config=None,
        get_warmup_steps=lambda num_training_steps: 0)
    ds = hf_ds.HfTrainerDeepSpeedConfig(cfg)
    try:
        ds.trainer_config_process(args)
    except AttributeError as e:  # another transformers version reads other TrainingArguments fields
        pytest.skip(f"HfTrainerDeepSpeedConfig needs {e}")
    ds.trainer_config_finalize(args, model=None, num_training_steps=10)
    assert (ds.config["train_micro_batch_size_per_gpu"], ds.config["gradient_accumulation_steps"],
            ds.config["gradient_clipping"], ds.config["train_batch_size"]) == (4, 3, 0.5, 24)


def test_distill(tmp_path):
    """examples/distill.py: the tiny demo run as the teacher, one student per divergence asked for,
    its accuracy before and after printed."""
    out = _run("distill.py", "--steps", "3", "--divergences", "js", "alpha", "--run", str(tmp_path / "none"))
    assert "running the demo pipeline" in out and "done: 2 divergence(s), 3 steps each" in out
    assert re.search(r"^js\s+[\d.]+% +[\d.]+%", out, re.M) and re.search(r"^alpha=1.5\s+[\d.]+%", out, re.M), out
