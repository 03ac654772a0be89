"""Every example runs at its tiny size (subprocess, CPU, offline), so the examples cannot rot."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def _run(script, *args, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, str(EXAMPLES / script), "--tiny", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert "done" in proc.stdout or "unpatched: True" in proc.stdout, proc.stdout
    return proc.stdout


def _pair(pattern, text):
    m = re.search(pattern, text)
    assert m, text
    return float(m.group(1)), float(m.group(2))


def test_plain_pytorch_sft_matches_cross_entropy_and_js_runs():
    out = _run("plain_pytorch.py", "--steps", "2", "--divergence", "sft", "--beta", "1")
    fused, naive = _pair(r"fused ([-\d.]+) vs naive cross-entropy ([-\d.]+)", out)
    assert abs(fused - naive) < 1e-5
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


def test_deepspeed_zero3_config_is_valid():
    cfg = json.loads((EXAMPLES / "deepspeed_zero3.json").read_text())
    assert cfg["zero_optimization"]["stage"] == 3
    assert cfg["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping"):
        assert cfg[key] == "auto"  # filled in from TrainingArguments by the HF integration
