"""Smoke test of the benchmark suite (bench/): one tiny case end to end, and its memory probe.

Budget: < 30 s on 2 cores. The benchmarks themselves are not run here (``make bench``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bench.common import MIB  # noqa: E402
from bench.update_readme import END, START, replace_between  # noqa: E402


def test_cpu_peak_memory_probe_sees_a_known_allocation():
    """A 64 MiB tensor allocated and freed inside the call shows up as ~64 MiB of peak; a tiny one
    as almost nothing. Run in a fresh interpreter: the probe retunes glibc malloc process-wide."""
    code = (
        "import json, torch\n"
        "from bench.common import measure_peak\n"
        "big = measure_peak(lambda: float(torch.ones(16 * 1024 * 1024)[-1]), torch.device('cpu'))\n"
        "small = measure_peak(lambda: float(torch.ones(1024).sum()), torch.device('cpu'))\n"
        "print(json.dumps([big['peak_mib'], small['peak_mib']]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    big, small = json.loads(proc.stdout.strip().splitlines()[-1])
    assert 60 <= big <= 80, big  # 64 MiB plus allocator and first-touch overhead (seen up to 73)
    assert small < 8, small


def test_readme_section_replaced_between_markers_only():
    text = f"# x\nintro\n{START}\nold table\n{END}\ntail\n"
    new = replace_between(text, "new table")
    assert new == f"# x\nintro\n{START}\nnew table\n{END}\ntail\n"
    with pytest.raises(SystemExit, match="markers"):
        replace_between("# no markers\n", "t")


def test_one_tiny_bench_case_end_to_end(tmp_path):
    """Runs the tiny CE case for naive torch and fk[torch] (fwd+bwd) through pytest-benchmark and
    checks the results file: timings, peak memory, correctness check, provenance, report."""
    out = tmp_path / "tiny.json"
    cmd = [sys.executable, "-m", "pytest", "bench/bench_ce.py", "--benchmark-only", "-q", "-p", "no:cacheprovider",
           "--bench-profile=tiny", "--bench-mem=inprocess", "-m", "not gpu",
           "-k", "fwdbwd and (naive- or fk[torch] or fk[triton] or gemm)", f"--benchmark-json={out}"]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # as `make bench` runs: no interpreter
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    data = json.loads(out.read_text())
    by = {b["extra_info"]["case"]["impl"]: b for b in data["benchmarks"]}
    assert {"naive", "fk[torch]", "gemm"} <= set(by), sorted(by)
    floor = by.pop("gemm")
    assert floor["extra_info"]["check"] == "n/a (GEMM floor)" and floor["stats"]["min"] > 0
    for b in by.values():
        e = b["extra_info"]
        assert e["check"] == "ok" and e["rel_err"] < 1e-4, e
        assert b["stats"]["min"] > 0
        assert e["peak_mib"] > 0
        assert e["provenance"]["git_commit"] and e["provenance"]["versions"]["torch"]
    # naive holds the [N, V] logits (2 MiB here) at least twice; fk[torch] must not be above it
    assert by["naive"]["extra_info"]["peak_mib"] >= 2 * 256 * 2048 * 4 / MIB
    prov = data["fdiv"]["provenance"]
    for key in ("device", "cpu_model", "git_commit", "date_utc", "command", "versions"):
        assert prov[key], key
    # the triton backend cannot run on CPU tensors: it must be listed as skipped with a reason
    skipped = [s for s in data["fdiv"]["skipped"] if s["impl"] == "fk[triton]"]
    from fdiv_kernels.kernels.backends import backend_names
    if "triton" in backend_names() and not torch.cuda.is_available():
        assert skipped and skipped[0]["reason"]
    from bench import report
    md = report.render(report.load(str(out)), str(tmp_path / "tiny"))
    assert "`naive`" in md and "`fk[torch]`" in md and "git commit" in md
    # the "x GEMM floor" column: fk[torch]'s time over the bare 3 GEMMs of the same run
    assert "| x GEMM floor |" in md
    ratio = by["fk[torch]"]["stats"]["min"] / floor["stats"]["min"]
    row = next(line for line in md.splitlines() if line.startswith("| `fk[torch]`"))
    assert row.split("|")[5].strip() == f"{ratio:.2f}", row
