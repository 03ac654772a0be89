"""Smoke version of the mini-lab: one divergence run, the stability comparison, results.md written."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_minilab_smoke(tmp_path):
    res = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "minilab", "run.py"), "--smoke", "--seeds", "0",
         "--skip", "lr", "mix", "--out", str(tmp_path / "fig"), "--results", str(tmp_path / "results.md"),
         "--runs", str(tmp_path / "runs")],
        capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    md = (tmp_path / "results.md").read_text()
    for section in ("## 2. Divergences", "## 3. Stability", "## 4. V(s0)"):
        assert section in md
    assert "| div=js |" in md and "kl: naive exp(-r-1)" in md
    for png in ("divergences.png", "stability.png", "value_s0_alignment.png"):
        assert os.path.getsize(tmp_path / "fig" / png) > 5000
