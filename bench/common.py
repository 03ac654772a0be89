"""Shared helpers for the benchmark suites: provenance, peak-memory probes, seeded inputs.

Peak memory
-----------
* CUDA: ``torch.cuda.max_memory_allocated() - memory_allocated()`` around one call (exact).
* CPU: peak resident set size above the baseline taken right before the call. The kernel's
  high-water mark ``VmHWM`` is reset by writing ``5`` to ``/proc/self/clear_refs``; glibc is
  told (``mallopt``) to serve every block above 64 KiB by ``mmap`` so that freed tensors go back
  to the OS and a later call cannot hide its peak in memory kept from an earlier one.
"""

from __future__ import annotations

import ctypes
import datetime as _dt
import gc
import json
import os
import platform
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict

import torch

MIB = 1024.0 * 1024.0
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ---------------------------------------------------------------------------------------------
# allocator / RSS tools (Linux)
# ---------------------------------------------------------------------------------------------
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MALLOPT_DONE = False


def tune_glibc_malloc(mmap_threshold: int = 64 * 1024) -> bool:
    """Serve blocks >= ``mmap_threshold`` bytes with mmap (returned to the OS on free). Idempotent."""
    global _MALLOPT_DONE
    if _MALLOPT_DONE:
        return True
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold) == 1
        ok &= libc.mallopt(_M_TRIM_THRESHOLD, 2 * mmap_threshold) == 1
        _MALLOPT_DONE = ok
        return ok
    except OSError:
        return False


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def rss_bytes() -> int:
    return _status_kib("VmRSS") * 1024


def peak_rss_bytes() -> int:
    return _status_kib("VmHWM") * 1024


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_peak(fn: Callable[[], object], device: torch.device) -> Dict[str, float]:
    """Run ``fn()`` once; return ``{"peak_mib", "time_s", "mem_method"}`` (peak above baseline)."""
    import time

    from fdiv_kernels.kernels import release_workspaces

    release_workspaces()  # buffers a warm-up left for reuse count in the measured call's peak
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize(device)
        dt = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated(device) - base
        del out
        return {"peak_mib": peak / MIB, "time_s": dt, "mem_method": "torch.cuda.max_memory_allocated"}
    tune_glibc_malloc()
    if not reset_peak_rss():
        raise RuntimeError("cannot reset VmHWM (/proc/self/clear_refs not writable)")
    base = rss_bytes()
    t0 = time.perf_counter()
    out = fn()
    dt = time.perf_counter() - t0
    peak = peak_rss_bytes() - base
    del out
    return {"peak_mib": max(peak, 0) / MIB, "time_s": dt, "mem_method": "VmHWM-VmRSS (clear_refs)"}


def probe_in_subprocess(spec: dict, *, timeout: float = 600.0) -> Dict[str, float]:
    """Measure one case in a fresh interpreter (``python -m bench.memprobe``); see memprobe.py."""
    env = dict(os.environ)
    env.setdefault("PYTHONPATH", REPO)
    env["PYTHONPATH"] = REPO + os.pathsep + env["PYTHONPATH"] if REPO not in env["PYTHONPATH"] else env["PYTHONPATH"]
    proc = subprocess.run([sys.executable, "-m", "bench.memprobe", json.dumps(spec)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("MEMPROBE ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"memory probe failed (rc={proc.returncode}): {' | '.join(tail)}")
    return json.loads(lines[-1][len("MEMPROBE "):])


# ---------------------------------------------------------------------------------------------
# provenance
# ---------------------------------------------------------------------------------------------

def _cpu_model() -> str:
    from fdiv_kernels.kernels.backends import cpu_model_name  # the key backend="auto" looks up
    return cpu_model_name()


def _version(mod: str) -> str:
    try:
        from importlib.metadata import version
        return version(mod)
    except Exception:
        return "not installed"


def _git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except Exception:
        return "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {_cpu_model()}, {os.cpu_count()} cores ({torch.get_num_threads()} torch threads)"


def device_slug(device: torch.device) -> str:
    """Short file-name-safe device name: ``cpu-2core`` / ``nvidia-h100-80gb-hbm3``."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device).lower()
        return "".join(c if c.isalnum() else "-" for c in name).strip("-")
    return f"cpu-{os.cpu_count()}core"


def provenance(device: torch.device, command: str) -> dict:
    """Everything a result row needs to be reproduced and judged."""
    return {
        "device": device_name(device),
        "device_type": device.type,
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "versions": {m: _version(m) for m in ("torch", "triton", "liger-kernel", "cut-cross-entropy", "trl",
                                              "transformers", "fdiv-kernels", "pytest-benchmark")},
        "cuda": torch.version.cuda,
        "git_commit": _git_commit(),
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": command,
        "note": ("CPU numbers were taken on a development machine that other engineers may have been "
                 "using at the same time; compare ratios within one run, not absolute times across runs."
                 if device.type == "cpu" else ""),
    }


# ---------------------------------------------------------------------------------------------
# cases and inputs
# ---------------------------------------------------------------------------------------------
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}


@dataclass(frozen=True)
class Case:
    """One benchmark point. ``n`` tokens (= ``batch * seq``), hidden ``h``, vocabulary ``v``."""

    suite: str
    impl: str
    mode: str  # "fwd" or "fwdbwd"
    n: int
    h: int
    v: int
    dtype: str = "fp32"
    device: str = "cpu"
    seq: int = 0  # > 0: rows of ``seq`` tokens (divergence / DPO suites); 0: a flat [n] batch
    ignore_frac: float = 0.1
    extra: Dict[str, object] = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_json(d: dict) -> "Case":
        return Case(**d)

    @property
    def shape(self) -> str:
        rows = f"{self.n // self.seq}x{self.seq}" if self.seq else f"{self.n}"
        return f"N={rows} H={self.h} V={self.v}"

    @property
    def id(self) -> str:
        return f"{self.suite}-{self.impl}-{self.mode}-{self.dtype}-{self.n}x{self.h}x{self.v}"


def make_inputs(case: Case, *, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Seeded ``hidden [N, H]`` (or ``[N/seq, seq, H]``), ``weight [V, H]``, ``labels`` with
    ``ignore_frac`` of positions set to -100 (random positions for flat batches, a prompt prefix
    of each row for row batches). Weight scale gives logits of order 1-5, as in trained heads.
    ``hidden`` and ``weight`` require grad in both modes: "fwd" is a training forward (what it
    keeps for the backward counts in its memory)."""
    g = torch.Generator().manual_seed(seed)
    dt = DTYPES[case.dtype]
    dev = torch.device(case.device)
    hidden = torch.randn(case.n, case.h, generator=g)
    weight = torch.randn(case.v, case.h, generator=g) * (2.0 / case.h ** 0.5)
    labels = torch.randint(0, case.v, (case.n,), generator=g)
    if case.seq:
        rows = case.n // case.seq
        hidden = hidden.reshape(rows, case.seq, case.h)
        labels = labels.reshape(rows, case.seq)
        prompt = int(round(case.ignore_frac * case.seq))
        labels[:, :prompt] = -100
    else:
        drop = torch.rand(case.n, generator=g) < case.ignore_frac
        labels[drop] = -100
    return {
        "hidden": hidden.to(dev, dt).requires_grad_(True),
        "weight": weight.to(dev, dt).requires_grad_(True),
        "labels": labels.to(dev),
    }


def clear_grads(inputs: Dict[str, torch.Tensor]) -> None:
    for t in inputs.values():
        if isinstance(t, torch.Tensor) and t.grad is not None:
            t.grad = None

