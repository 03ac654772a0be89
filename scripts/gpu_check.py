"""One prepared check of every GPU path and the headline benchmark (``make gpu-check``).

Runs on the GPU machine as it is (its own ``python3``, torch, triton; no venv, no network), from
the source tree (``PYTHONPATH``; nothing is installed but the carried peer wheels, into a folder
of the tree). Steps run as subprocesses, each under its own time budget (killed with its process
group when over it, so one hang leaves the others); steps of one group run at the same time. See
docs/gpu.md for what each step proves.

    python3 scripts/gpu_check.py              # the check; results in $GPU_CHECK_OUT (bench/results/)
    python3 scripts/gpu_check.py --dry-run    # any machine: the plan with budgets + what can be checked here
    python3 scripts/gpu_check.py --only triton-tests,cuda-tests

Results: ``<date>-gpu-check-<device>.json`` and ``.md`` (device, driver, versions, commit, date,
command, every step's status and time, the headline tables and per-kernel breakdowns) and the
full step logs in ``<same stem>-logs/``. Exit status 1 when any gating step failed or ran out of
time (a test failed, a loss check mismatched, an fk backend raised), else 0.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import importlib.util
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parent.parent
TOTAL_BUDGET_S = 480
GPU_TARGET = {"python": "3.12", "torch": "2.11.0+cu130"}
"""The GPU machine's Python and torch (docs/gpu.md): what a prebuilt extension must be built for."""
WHEELS = REPO / ".gpu-wheels"
SITE = REPO / "build" / "gpu-check" / "site"
NEEDED_FILES = ("tests/test_triton.py", "tests/test_cuda_compile.py", "bench/headline.py", "bench/impls.py",
                "fdiv_kernels/kernels/native.py", "fdiv_kernels/kernels/triton_kernels.py")
HEADLINE_ROUNDS = 3


@dataclass
class Step:
    """One subprocess with a budget. ``group``: steps with the same group run at the same time,
    groups run in increasing order. ``gate``: its failure makes the exit status 1; with
    ``timeout_gates=False`` running out of time does not (the benchmark steps: what they measured
    is kept and judged row by row). ``needs``: steps that must have passed first (else this one is
    skipped, with that reason)."""

    name: str
    budget_s: int
    group: int
    proves: str
    argv: List[str]
    gate: bool = True
    needs: tuple = ()
    timeout_gates: bool = True
    must_print: str = ""  # regex its output must contain to pass (e.g. a pytest "N passed")
    must_not_print: str = ""  # regex that fails it (e.g. GPU tests skipped for want of a GPU)
    env: Dict[str, str] = field(default_factory=dict)
    skip_reason: str = ""


@dataclass
class Outcome:
    name: str
    budget_s: int
    status: str  # passed | failed | timeout | skipped
    wall_s: float = 0.0
    rc: Optional[int] = None
    log: str = ""
    tail: str = ""
    reason: str = ""


def load_native():
    """fdiv_kernels/kernels/native.py by path (no torch, no package import needed for the checks)."""
    spec = importlib.util.spec_from_file_location("_fdiv_native_check", REPO / "fdiv_kernels" / "kernels" / "native.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


ENV_SCRIPT = r'''
import json, platform, subprocess, sys
from importlib.metadata import version
def ver(m):
    try:
        return version(m)
    except Exception:
        return "not installed"
info = {"python": platform.python_version(), "host": platform.node(), "cpu_count": __import__("os").cpu_count()}
try:
    q = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                       capture_output=True, text=True, timeout=20).stdout.strip()
    info["nvidia_smi"] = q
    info["driver"] = q.split(",")[1].strip() if "," in q else "unknown"
except Exception as exc:
    info["nvidia_smi"] = f"nvidia-smi failed: {exc}"
    info["driver"] = "unknown"
import torch
info["torch"] = torch.__version__
info["torch_cuda"] = torch.version.cuda
info["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
info["versions"] = {m: ver(m) for m in ("torch", "triton", "transformers", "liger-kernel", "cut-cross-entropy",
                                        "pytest", "pytest-xdist", "pytest-benchmark", "ninja", "numpy")}
try:
    subprocess.run(["nvidia-smi"], timeout=20)
except Exception as exc:
    print(f"nvidia-smi: {exc}")
print("GPU_CHECK_ENV " + json.dumps(info, sort_keys=True))
'''

EXTENSION_SCRIPT = r'''
import logging, time
logging.basicConfig(level=logging.INFO, format="%(message)s")
t0 = time.perf_counter()
from fdiv_kernels.kernels import native
mod = native.load("cuda")
src = "prebuilt" if "_prebuilt" in (mod.__file__ or "") else "built here"
print(f"cuda extension {src}: {mod.__file__} in {time.perf_counter() - t0:.1f} s")
'''


PASSED = r"\b[1-9]\d* passed"
NO_GPU_SKIPS = r"SKIPPED .*(no CUDA device|needs a CUDA device)"
"""A test step passes only when tests passed and none was skipped for want of a GPU."""


def _pytest(files: List[str], workers: int) -> List[str]:
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfEs", *files]
    if workers > 1 and _has("xdist"):
        argv += ["-n", str(workers)]
    return argv


def plan(out_stem: Path) -> List[Step]:
    """The steps, their budgets and what each proves (the source of both the run and the dry run)."""
    py = sys.executable
    wheels = sorted(WHEELS.glob("*.whl"))
    headline = Path(f"{out_stem}-headline.jsonl")
    triton_env = {"TRITON_INTERPRET": "0", "FDIV_TRITON_AUTOTUNE": "first"}
    steps = [
        Step("peer-wheels", 20, 0, "Liger and cut-cross-entropy importable for the benchmark (carried wheels)",
             [py, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(SITE), *map(str, wheels)],
             gate=False, skip_reason="" if wheels else f"no wheels in {WHEELS.name}/ (make gpu-wheels): the liger "
                                                       "and cce rows will be SKIPPED"),
        Step("environment", 15, 1, "device, driver and versions for the results (nvidia-smi, torch, triton)",
             [py, "-c", ENV_SCRIPT], gate=False),
        Step("cuda-extension", 150, 2, "the CUDA extension loads: the prebuilt one when it matches this "
             "Python/torch/sources, else a build here (nvcc)", [py, "-c", EXTENSION_SCRIPT], env={"MAX_JOBS": "8"}),
        Step("triton-tests", 150, 2, "tests/test_triton.py on the compiled kernels (TRITON_INTERPRET=0, one "
             "autotune config per kernel and dtype): values and gradients vs a float64 oracle, bf16/fp16, filter, "
             "atomics, masked vocabulary, device guard", _pytest(["tests/test_triton.py"], 8), env=triton_env,
             must_print=PASSED, must_not_print=NO_GPU_SKIPS),
        Step("cuda-tests", 60, 3, "tests/test_cuda_compile.py: backend='cuda' vs the torch reference on the GPU "
             "(fp32/bf16/fp16, odd shapes, soft-cap, entropy, bias, several chunks) and the nvcc compile checks",
             _pytest(["tests/test_cuda_compile.py"], 4), needs=("cuda-extension",), must_print=PASSED,
             must_not_print=NO_GPU_SKIPS),
    ]
    for shape, group in (("llama", 4), ("gemma", 5)):
        steps.append(Step(
            f"bench-{shape}", 105, group,
            f"headline fwd+bwd at the {shape} shape: GEMM floor, naive, torch.compile, every fk backend, Liger/CCE "
            "when present; time, peak memory, loss checked vs float32 naive, per-kernel profile of the fk rows",
            [py, "-m", "bench.headline", "--shape", shape, "--rounds", str(HEADLINE_ROUNDS), "--out", str(headline),
             "--deadline", "80"], env=triton_env, timeout_gates=False))
    return steps


def shown(argv: List[str]) -> str:
    """The command for people: an inline ``-c`` script is shown by its first line."""
    parts = [f"<script: {a.strip().splitlines()[0][:50]}...>" if "\n" in a else a for a in argv]
    return shlex.join(parts)


def wall_budget(steps: List[Step]) -> int:
    """Wall-clock budget: groups run one after another, the steps of a group side by side."""
    groups: Dict[int, int] = {}
    for s in steps:
        groups[s.group] = max(groups.get(s.group, 0), s.budget_s)
    return sum(groups.values()) + REPORT_BUDGET_S


REPORT_BUDGET_S = 5


@functools.lru_cache(maxsize=1)
def _cuda_home() -> Optional[str]:
    return os.environ.get("CUDA_HOME") or load_native().cuda_home_from_nvcc()


def step_env(step: Step) -> Dict[str, str]:
    """The machine's environment plus: the tree (and the carried wheels) on PYTHONPATH, an
    extension cache inside the tree, CUDA_HOME from the nvcc on PATH, no Triton interpreter."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    if _cuda_home():
        env["CUDA_HOME"] = _cuda_home()
    paths = [str(REPO)] + ([str(SITE)] if SITE.is_dir() else []) + [p for p in [env.get("PYTHONPATH")] if p]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / "build" / "gpu-check" / "torch-extensions"))
    env["PYTHONUNBUFFERED"] = "1"
    env.update(step.env)
    return env


def run_steps(steps: List[Step], log_dir: Path, echo=print) -> List[Outcome]:
    """Run the steps group by group, each under its budget; returns one outcome per step."""
    log_dir.mkdir(parents=True, exist_ok=True)
    done: Dict[str, Outcome] = {}
    for group in sorted({s.group for s in steps}):
        running = []
        for s in (s for s in steps if s.group == group):
            missing = [n for n in s.needs if n in done and done[n].status != "passed"]
            if s.skip_reason or missing:
                why = s.skip_reason or f"needs {', '.join(missing)}, which did not pass"
                done[s.name] = Outcome(s.name, s.budget_s, "skipped", reason=why)
                echo(f"gpu-check: {s.name}: skipped ({why})")
                continue
            log = log_dir / f"{s.name}.log"
            fh = open(log, "w")
            fh.write(f"$ {shown(s.argv)}\n")
            fh.flush()
            echo(f"gpu-check: {s.name}: started (budget {s.budget_s} s)")
            proc = subprocess.Popen(s.argv, cwd=REPO, env=step_env(s), stdout=fh, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            running.append((s, proc, fh, log, time.monotonic()))
        for s, proc, fh, log, t0 in running:
            left = s.budget_s - (time.monotonic() - t0)
            status = "passed"
            try:
                proc.wait(timeout=max(left, 0.1))
            except subprocess.TimeoutExpired:
                status = "timeout"
                _kill_group(proc)
            fh.close()
            wall = time.monotonic() - t0
            text = log.read_text(errors="replace")
            reason = f"killed after its budget of {s.budget_s} s" if status == "timeout" else ""
            if status != "timeout" and proc.returncode != 0:
                status, reason = "failed", f"exit status {proc.returncode}"
            elif status == "passed" and s.must_print and not re.search(s.must_print, text):
                status, reason = "failed", f"its output lacks /{s.must_print}/"
            elif status == "passed" and s.must_not_print and re.search(s.must_not_print, text):
                found = re.search(s.must_not_print, text).group(0)
                status, reason = "failed", f"its output has {found[:120]!r}"
            tail = "\n".join(text.splitlines()[-25:])
            done[s.name] = Outcome(s.name, s.budget_s, status, wall, proc.returncode, str(log), tail, reason=reason)
            echo(f"gpu-check: {s.name}: {status} in {wall:.0f} s (budget {s.budget_s} s)\n" +
                 "\n".join("    " + line for line in tail.splitlines()[-12:]))
    return [done[s.name] for s in steps]


def _kill_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


# --------------------------------------------------------------------------------------------
# Results.
# --------------------------------------------------------------------------------------------

def _commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return sha or os.environ.get("GPU_CHECK_COMMIT") or "unknown (no git here; pass GPU_CHECK_COMMIT=<sha>)"


def parse_env(outcomes: List[Outcome]) -> dict:
    for o in outcomes:
        if o.name == "environment" and o.log and os.path.exists(o.log):
            for line in Path(o.log).read_text(errors="replace").splitlines():
                if line.startswith("GPU_CHECK_ENV "):
                    return json.loads(line[len("GPU_CHECK_ENV "):])
    return {}


def read_headline(path: Path) -> List[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def headline_failures(rows: List[dict]) -> List[str]:
    """Rows that fail the check: a loss mismatch anywhere, or an fk backend that raised."""
    bad = []
    for r in rows:
        if r.get("status") == "ok" and not str(r.get("check", "")).startswith(("ok", "n/a")):
            bad.append(f"{r['shape']} {r['impl']}: {r['check']}")
        if r.get("status") == "FAILED" and str(r.get("impl", "")).startswith("fk["):
            bad.append(f"{r['shape']} {r['impl']}: {r['reason']}")
    return bad


def _mib(x) -> str:
    return "-" if x is None else f"{x:.0f}"


def _ratio(a, b) -> str:
    return f"{a / b:.2f}" if a is not None and b else "-"


def headline_tables(rows: List[dict]) -> List[str]:
    out = []
    for shape in dict.fromkeys(r["shape"] for r in rows):
        rs = [r for r in rows if r["shape"] == shape]
        ok = {r["impl"]: r for r in rs if r.get("status") == "ok"}
        floor, naive = ok.get("gemm", {}).get("t_min"), ok.get("naive", {}).get("t_min")
        naive_mem = ok.get("naive", {}).get("peak_mib")
        r0 = rs[0]
        out += [f"### fwd+bwd, {r0['shape_label']}: N={r0['n']}, H={r0['h']}, V={r0['v']}, {r0['dtype']}", "",
                "| implementation | time (min) | time (median) | x GEMM floor | time / naive | peak MiB | mem / naive "
                "| check |", "|---|---|---|---|---|---|---|---|"]
        for r in sorted(ok.values(), key=lambda r: r["t_min"]):
            out.append(f"| `{r['impl']}`: {r['label']} | {r['t_min'] * 1e3:.1f} ms | {r['t_median'] * 1e3:.1f} ms | "
                       f"{_ratio(r['t_min'], floor)} | {_ratio(r['t_min'], naive)} | {_mib(r['peak_mib'])} | "
                       f"{_ratio(r['peak_mib'], naive_mem)} | {r['check']} |")
        for r in rs:
            if r.get("status") != "ok":
                out.append(f"| `{r['impl']}` | {r['status']} | | | | | | {r.get('reason', '')} |")
        out.append("")
        for r in ok.values():
            if r.get("kernels"):
                out += [f"Kernels of `{r['impl']}` (one fwd+bwd under torch.profiler):", "",
                        "| kernel | CUDA ms | share | calls |", "|---|---|---|---|"]
                out += [f"| `{k['kernel'][:90]}` | {k['ms']:.2f} | {k['share']:.0%} | {k['calls']} |" for k in r["kernels"]]
                out.append("")
    return out


def device_slug(env: dict) -> str:
    name = env.get("device", "") or "unknown-device"
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


def write_results(stem: Path, outcomes: List[tuple], rows: List[dict], env: dict, command: str,
                  started: str, wall_s: float) -> bool:
    """``<stem>.json`` and ``<stem>.md`` from ``(Outcome, Step)`` pairs and the headline rows;
    returns whether everything that gates passed."""
    failures = [f"{o.name}: {o.status}" for o, s in outcomes
                if s.gate and (o.status == "failed" or (o.status == "timeout" and s.timeout_gates))]
    failures += headline_failures(rows)
    passed = not failures
    data = {"command": command, "date_utc": started, "commit": _commit(), "environment": env,
            "device": env.get("device", "unknown"), "driver": env.get("driver", "unknown"),
            "versions": env.get("versions", {}), "passed": passed, "failures": failures,
            "wall_s": round(wall_s, 1), "budget_s": TOTAL_BUDGET_S,
            "triton_autotune": "first config per kernel and dtype (FDIV_TRITON_AUTOTUNE=first)",
            "steps": [dict(asdict(o), gate=s.gate, proves=s.proves) for o, s in outcomes], "headline": rows}
    stem.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{stem}.json").write_text(json.dumps(data, indent=1, sort_keys=True, default=str) + "\n")
    v = data["versions"]
    md = [f"# GPU check: {data['device']}", "",
          f"- result: **{'PASSED' if passed else 'FAILED'}**" + ("" if passed else ": " + "; ".join(failures)),
          f"- device: {env.get('nvidia_smi', data['device'])}; driver {data['driver']}; host {env.get('host', '?')} "
          f"({env.get('cpu_count', '?')} CPUs)",
          f"- versions: Python {env.get('python', '?')}, " + ", ".join(f"{k} {v[k]}" for k in sorted(v))
          + f", CUDA (torch) {env.get('torch_cuda', '?')}",
          f"- commit `{data['commit']}`; date {started}; wall {wall_s:.0f} s of a {TOTAL_BUDGET_S} s budget",
          f"- command: `{command}`",
          f"- Triton: {data['triton_autotune']}", "",
          "## Steps", "", "| step | budget | took | status | proves |", "|---|---|---|---|---|"]
    for o, s in outcomes:
        md.append(f"| {o.name} | {o.budget_s} s | {o.wall_s:.0f} s | {o.status}{' (' + o.reason + ')' if o.reason else ''}"
                  f" | {s.proves} |")
    md += ["", "## Headline benchmark", "",
           f"Forward+backward of the mean NLL, bf16; {HEADLINE_ROUNDS} timed rounds after a warm-up that is also the "
           "loss check (float32 naive torch, rel. tol. 3e-2); peak memory above the inputs of the first timed round; "
           "`x GEMM floor` = time / the bare 3 GEMMs of the same shape.", ""]
    md += headline_tables(rows) or ["(no headline results)", ""]
    for o, s in outcomes:
        if o.status in ("failed", "timeout"):
            md += [f"## Log tail: {o.name} ({o.status})", "", "```", o.tail, "```", ""]
    Path(f"{stem}.md").write_text("\n".join(md) + "\n")
    return passed


# --------------------------------------------------------------------------------------------
# Dry run.
# --------------------------------------------------------------------------------------------

def dry_run(steps: List[Step], stem: Path) -> int:
    """Print the plan; check the files, the budgets and the extension's import path; 0 when fine."""
    problems = []
    print(f"gpu-check plan (dry run; results would go to {stem}.json/.md):")
    for s in steps:
        extra = f"  [skipped: {s.skip_reason}]" if s.skip_reason else ""
        print(f"  group {s.group}  {s.name:<15} budget {s.budget_s:>3} s  {'gate' if s.gate else 'info'}  "
              f"{s.proves}{extra}\n      $ {shown(s.argv)}")
    total = wall_budget(steps)
    print(f"  report: {REPORT_BUDGET_S} s\n  wall-clock budget: {total} s (groups in sequence, steps of a group side "
          f"by side; limit {TOTAL_BUDGET_S} s)")
    if total > TOTAL_BUDGET_S:
        problems.append(f"the budgets add up to {total} s > {TOTAL_BUDGET_S} s")
    missing = [f for f in NEEDED_FILES if not (REPO / f).is_file()]
    native = load_native()
    try:
        missing += [s for s in native.sources("cuda") if not os.path.isfile(s)]
    except native.NativeBuildError as exc:
        missing.append(str(exc))
    print(f"  files: {'all present' if not missing else 'MISSING ' + ', '.join(missing)}")
    if missing:
        problems.append("missing files")
    lib, manifest = native.read_prebuilt("cuda")
    where = native.prebuilt_dir() / "cuda"
    if manifest is None:
        print(f"  cuda extension: no prebuilt module in {where} (make gpu-prebuild): the check builds it there")
    else:
        why = "its library is missing" if lib is None else native.prebuilt_mismatch(
            "cuda", manifest, python=GPU_TARGET["python"], torch_version=GPU_TARGET["torch"])
        if why:
            print(f"  cuda extension: the prebuilt {where} will NOT be used on the GPU machine ({why}): the check "
                  "builds it there (make gpu-prebuild to refresh)")
        else:
            print(f"  cuda extension: prebuilt {lib} ({lib.stat().st_size / 2**20:.1f} MiB, built "
                  f"{manifest.get('built_utc')} in {manifest.get('build_seconds')} s) matches Python "
                  f"{GPU_TARGET['python']}, torch {GPU_TARGET['torch']} and the current sources: it will be imported")
    wheels = sorted(WHEELS.glob("*.whl"))
    print(f"  peer wheels: {', '.join(w.name for w in wheels) if wheels else 'none (make gpu-wheels)'}")
    print(f"  pytest-xdist here: {'yes' if _has('xdist') else 'no (the GPU machine has it; tests run serially without)'}")
    for p in problems:
        print(f"gpu-check dry run: PROBLEM: {p}")
    print("gpu-check dry run: " + ("ok" if not problems else "FAILED"))
    return 1 if problems else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="print the plan and check what can be checked here")
    ap.add_argument("--only", default="", help="comma-separated step names to run (the others are left out)")
    ap.add_argument("--out", default=os.environ.get("GPU_CHECK_OUT") or str(REPO / "bench" / "results"))
    a = ap.parse_args(argv)
    started = dt.datetime.now(dt.timezone.utc)
    stem = Path(a.out).resolve() / f"{started:%Y-%m-%d}-gpu-check"
    steps = plan(stem)
    if a.only:
        wanted = set(a.only.split(","))
        unknown = wanted - {s.name for s in steps}
        if unknown:
            ap.error(f"--only: unknown step(s) {sorted(unknown)}; steps: {[s.name for s in steps]}")
        steps = [s for s in steps if s.name in wanted]
    if a.dry_run:
        return dry_run(steps, stem)
    command = shlex.join([sys.executable, *sys.argv])
    headline = Path(f"{stem}-headline.jsonl")
    if headline.exists():
        headline.unlink()  # this run's rows only
    t0 = time.monotonic()
    outcomes = run_steps(steps, Path(f"{stem}-logs"))
    env = parse_env(outcomes)
    result = stem.parent / f"{stem.name}-{device_slug(env)}"
    passed = write_results(result, list(zip(outcomes, steps)), read_headline(headline), env, command,
                           f"{started:%Y-%m-%dT%H:%M:%SZ}", time.monotonic() - t0)
    print(f"gpu-check: {'PASSED' if passed else 'FAILED'}; results {result}.json and {result}.md")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
