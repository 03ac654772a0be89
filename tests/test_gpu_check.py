"""``make gpu-check`` checked on a CPU machine: the dry run, the step runner's budgets, the results.

The GPU steps themselves need the GPU machine (docs/gpu.md); here: the dry run that CI runs
(``make gpu-check DRY_RUN=1``: every step with its budget, budgets within 480 s, the files and the
extension's import path), a hung step killed at its budget while the next one still runs, and the
JSON/Markdown results built from a real (tiny, CPU) run of the headline benchmark module.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "scripts" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


gc = _gpu_check()


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_dry_run_lists_every_step_with_a_budget_within_480_s():
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS")}
    proc = subprocess.run(["make", "-s", "gpu-check", "DRY_RUN=1", f"PYTHON={sys.executable}"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    steps = gc.plan(Path("/nowhere/x"))
    budgets = {}
    for s in steps:
        found = re.search(rf"group (\d+)\s+{re.escape(s.name)}\s+budget\s+(\d+) s", out)
        assert found, f"step {s.name} missing from the dry run:\n{out}"
        budgets[s.name] = (int(found.group(1)), int(found.group(2)))
    assert {"cuda-extension", "triton-tests", "cuda-tests", "bench-llama", "bench-gemma"} <= set(budgets)
    total = int(re.search(r"wall-clock budget: (\d+) s", out).group(1))
    by_group = {}
    for group, budget in budgets.values():
        by_group[group] = max(by_group.get(group, 0), budget)
    assert total == sum(by_group.values()) + gc.REPORT_BUDGET_S <= 480
    # the extension build and the compiled Triton tests share a group (they run side by side)
    assert budgets["cuda-extension"][0] == budgets["triton-tests"][0]
    assert "files: all present" in out
    assert re.search(r"cuda extension: (prebuilt .* it will be imported|no prebuilt module|the prebuilt .* NOT)", out)
    assert "TRITON_INTERPRET" not in " ".join(steps[3].argv) and steps[3].env["TRITON_INTERPRET"] == "0"
    assert out.rstrip().endswith("gpu-check dry run: ok")


def test_dry_run_reports_a_missing_file(monkeypatch, capsys):
    monkeypatch.setattr(gc, "NEEDED_FILES", gc.NEEDED_FILES + ("tests/no_such_test.py",))
    assert gc.dry_run(gc.plan(Path("/nowhere/x")), Path("/nowhere/x")) == 1
    assert "MISSING tests/no_such_test.py" in capsys.readouterr().out


def test_a_hung_step_is_killed_at_its_budget_and_the_rest_still_run(tmp_path):
    py = sys.executable
    pid_file = tmp_path / "child.pid"
    hang = ("import subprocess, sys, time\n"
            f"p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
            f"open({str(pid_file)!r}, 'w').write(str(p.pid))\n"
            "time.sleep(120)\n")
    steps = [
        gc.Step("hang", 2, 0, "hangs", [py, "-c", hang]),
        gc.Step("beside", 10, 0, "runs beside it", [py, "-c", "print('beside ok')"]),
        gc.Step("after", 10, 1, "runs after it", [py, "-c", "print('after ok')"]),
        gc.Step("needs-hang", 10, 2, "needs it", [py, "-c", "print('never')"], needs=("hang",)),
        gc.Step("fails", 10, 2, "fails", [py, "-c", "raise SystemExit(3)"]),
        gc.Step("gpu-skipped", 10, 2, "ran nothing on a GPU",
                [py, "-c", "print('SKIPPED [3] t.py:9: no CUDA device'); print('2 passed, 3 skipped')"],
                must_print=gc.PASSED, must_not_print=gc.NO_GPU_SKIPS),
        gc.Step("nothing-passed", 10, 2, "ran no test", [py, "-c", "print('1 skipped in 3 s')"], must_print=gc.PASSED),
        gc.Step("tests-passed", 10, 2, "ran tests", [py, "-c", "print('41 passed, 2 skipped in 9 s')"],
                must_print=gc.PASSED, must_not_print=gc.NO_GPU_SKIPS),
    ]
    t0 = time.monotonic()
    got = {o.name: o for o in gc.run_steps(steps, tmp_path / "logs", echo=lambda *_: None)}
    assert time.monotonic() - t0 < 30
    assert got["hang"].status == "timeout" and got["hang"].wall_s < 10
    child = int(pid_file.read_text())
    time.sleep(0.5)
    assert not _alive(child), "the hung step's child process survived"
    assert got["beside"].status == "passed" and "beside ok" in got["beside"].tail
    assert got["after"].status == "passed"
    assert got["needs-hang"].status == "skipped" and "hang" in got["needs-hang"].reason
    assert got["fails"].status == "failed" and got["fails"].rc == 3
    assert got["gpu-skipped"].status == "failed" and "no CUDA device" in got["gpu-skipped"].reason
    assert got["nothing-passed"].status == "failed" and got["tests-passed"].status == "passed"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_results_from_a_tiny_cpu_run_of_the_headline_benchmark(tmp_path):
    """bench.headline on CPU (tiny shape) -> JSON lines -> the check's JSON + Markdown, with the
    provenance fields, the x GEMM floor column, per-kernel rows, and the exit rule."""
    rows_path = tmp_path / "h.jsonl"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "bench.headline", "--shape", "tiny", "--device", "cpu", "--rounds",
                           "1", "--out", str(rows_path), "--impls", "gemm,fk[torch],naive,fk[triton]"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = gc.read_headline(rows_path)
    by = {r["impl"]: r for r in rows}
    assert by["gemm"]["status"] == by["naive"]["status"] == by["fk[torch]"]["status"] == "ok"
    assert by["fk[torch]"]["check"] == "ok" and by["fk[torch]"]["kernels"]
    assert by["fk[triton]"]["status"] == "SKIPPED" and by["fk[triton]"]["reason"]

    ok_step = gc.Step("s", 10, 0, "proves", ["x"])
    outcome = gc.Outcome("s", 10, "passed", 1.0, 0)
    env_info = {"device": "NVIDIA H200", "driver": "580.00", "python": "3.12.3",
                "versions": {"torch": "2.11.0+cu130", "triton": "3.6.0"}, "nvidia_smi": "NVIDIA H200, 580.00"}
    stem = tmp_path / "res"
    assert gc.write_results(stem, [(outcome, ok_step)], rows, env_info, "make gpu-check", "2026-01-01T00:00:00Z", 12.0)
    data = json.loads(Path(f"{stem}.json").read_text())
    for key in ("device", "driver", "versions", "commit", "date_utc", "command", "steps", "headline"):
        assert data[key], key
    assert data["passed"] is True
    md = Path(f"{stem}.md").read_text()
    assert "x GEMM floor" in md and "`fk[torch]`" in md and "Kernels of `fk[torch]`" in md and "PASSED" in md
    row = next(line for line in md.splitlines() if line.startswith("| `fk[torch]`"))
    assert row.split("|")[4].strip() == f"{by['fk[torch]']['t_min'] / by['gemm']['t_min']:.2f}", row

    bad_rows = [dict(r, check="MISMATCH (rel err 1e+00 > 0.03)") if r["impl"] == "fk[torch]" else r for r in rows]
    assert not gc.write_results(stem, [(outcome, ok_step)], bad_rows, env_info, "c", "d", 1.0)
    failed = gc.Outcome("s", 10, "timeout", 10.0, None, reason="killed")
    assert not gc.write_results(stem, [(failed, ok_step)], rows, env_info, "c", "d", 1.0)
    info_step = gc.Step("s", 10, 0, "proves", ["x"], gate=False)
    assert gc.write_results(stem, [(failed, info_step)], rows, env_info, "c", "d", 1.0)
    bench_step = gc.Step("s", 10, 0, "proves", ["x"], timeout_gates=False)  # a benchmark out of time: rows judged
    assert gc.write_results(stem, [(failed, bench_step)], rows, env_info, "c", "d", 1.0)
    crashed = gc.Outcome("s", 10, "failed", 1.0, 1)
    assert not gc.write_results(stem, [(crashed, bench_step)], rows, env_info, "c", "d", 1.0)
