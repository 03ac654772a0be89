"""The body every benchmark test shares: availability, correctness check, memory, timing.

For one :class:`~bench.common.Case`:

1. skip (recorded with its reason) when the implementation cannot run here;
2. first call = warm-up (compiles what must be compiled) and correctness check of the loss
   against a float32 reference computed from the same inputs (``ce``/``scaling``: naive torch;
   ``div``: ``fk.loss(logits=...)``; ``dpo``: the TRL way); the literal paper forms are only
   checked for finiteness (they are different formulas);
3. peak memory above baseline (``--bench-mem``; the scaling suite measures it in-process on its
   single timed call);
4. time with ``benchmark.pedantic`` (``rounds`` from the profile, 1 iteration each).
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

from . import collect
from .common import (MIB, Case, clear_grads, make_inputs, peak_rss_bytes, probe_in_subprocess, provenance,
                     reset_peak_rss, rss_bytes)
from .impls import get_impl, naive_ce, runner

TOL = {"fp32": 1e-3, "fp64": 1e-6, "bf16": 3e-2, "fp16": 3e-2}


def _skip(case: Case, reason: str, label: str = ""):
    collect.skipped(case, reason, label)
    pytest.skip(reason)


@functools.lru_cache(maxsize=8)
def _reference_loss(case_json: str) -> float:
    import json
    c = Case.from_json(json.loads(case_json))
    ref_impl = {"ce": "naive", "scaling": "naive", "div": "fk(logits)", "dpo": "trl"}[c.suite]
    c32 = Case(c.suite, ref_impl, "fwd", c.n, c.h, c.v, "fp32", c.device, c.seq, c.ignore_frac, c.extra)
    x = make_inputs(c32)
    if c.suite in ("ce", "scaling"):
        return float(naive_ce(x["hidden"], x["weight"], x["labels"]).detach())
    with torch.no_grad():
        return float(get_impl(c32).build(c32, x)().detach())


@functools.lru_cache(maxsize=2)
def _provenance(device_type: str) -> dict:
    """Per-session provenance stamped on every row (device, CPU, versions, commit, date, command)."""
    import os
    import sys
    cmd = os.environ.get("FDIV_BENCH_COMMAND", " ".join([sys.executable, "-m", "pytest", *sys.argv[1:]]))
    return provenance(torch.device(device_type), cmd)


def check_loss(case: Case, impl, out) -> dict:
    """``{"check": "ok" | "MISMATCH ..." | ...}`` plus the loss and its reference (see the module docstring)."""
    if impl.raw:
        return {"check": "n/a (GEMM floor)"}
    val = float(out.detach().float()) if isinstance(out, torch.Tensor) else float("nan")
    if case.impl == "paper":
        return {"loss": val, "check": "finite" if math.isfinite(val) else "NON-FINITE loss"}
    key = Case(case.suite, "", "fwd", case.n, case.h, case.v, case.dtype, case.device, case.seq,
               case.ignore_frac, {k: v for k, v in case.extra.items() if k == "divergence"})
    import json
    ref = _reference_loss(json.dumps(key.to_json(), sort_keys=True))
    rel = abs(val - ref) / max(abs(ref), 1e-12)
    ok = math.isfinite(val) and rel <= TOL[case.dtype]
    return {"loss": val, "ref_loss": ref, "rel_err": rel,
            "check": "ok" if ok else f"MISMATCH (rel err {rel:.2e} > {TOL[case.dtype]:g})"}


def run_case(benchmark, case: Case, options: dict) -> None:
    device = torch.device(case.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        _skip(case, "no CUDA device (torch.cuda.is_available() is False): run `make bench-gpu` on a GPU machine")
    impl = get_impl(case)
    ok, why = impl.available(device.type)
    if not ok:
        _skip(case, why, impl.label)
    cap = case.extra.get("naive_max_logit_bytes")
    if cap and impl.name == "naive" and case.n * case.v * 4 > cap:
        _skip(case, f"naive logits would take {case.n * case.v * 4 / 2**30:.1f} GiB fp32 (> {cap / 2**30:.0f} GiB "
                    f"cap for this shared machine); the trend is clear from the smaller points", impl.label)

    inputs = make_inputs(case)
    run = runner(impl, case, inputs)
    if device.type == "cuda":
        inner = run

        def run():
            out = inner()
            torch.cuda.synchronize(device)
            return out

    info = {"case": case.to_json(), "impl_label": impl.label, "fused_backward": impl.fused_backward,
            "shape": case.shape, "provenance": _provenance(device.type)}
    scaling = case.suite == "scaling"
    try:
        if not scaling:
            out = run()
            info.update(check_loss(case, impl, out))
            del out
        mem = None
        if device.type == "cpu" and not scaling and options["mem"] == "subprocess":
            clear_grads(inputs)
            mem = probe_in_subprocess(case.to_json())
            mem["mem_method"] = "subprocess: " + mem["mem_method"]
        inproc = scaling or device.type == "cuda" or options["mem"] == "inprocess"
        state = {}

        def setup():
            clear_grads(inputs)
            if inproc and "base" not in state:
                import gc

                from fdiv_kernels.kernels import release_workspaces
                release_workspaces()  # buffers kept from the warm-up count in the measured round's peak
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                    torch.cuda.reset_peak_memory_stats(device)
                    state["base"] = torch.cuda.memory_allocated(device)
                else:
                    reset_peak_rss()
                    state["base"] = rss_bytes()

        first = {"done": False}

        def target():
            run()
            if inproc and not first["done"]:
                first["done"] = True
                if device.type == "cuda":
                    state["peak"] = torch.cuda.max_memory_allocated(device) - state["base"]
                else:
                    state["peak"] = peak_rss_bytes() - state["base"]
            return None

        benchmark.pedantic(target, setup=setup, rounds=1 if scaling else options["rounds"], iterations=1,
                           warmup_rounds=0)
        if inproc:
            mem = {"peak_mib": max(state["peak"], 0) / MIB,
                   "mem_method": ("in-process torch.cuda.max_memory_allocated" if device.type == "cuda"
                                  else "in-process VmHWM-VmRSS (clear_refs), first timed round")}
    except pytest.skip.Exception:
        raise
    except Exception as e:  # a peer that fails to run is reported, not dropped
        _skip(case, f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}", impl.label)
    if mem is not None:
        info["peak_mib"] = mem["peak_mib"]
        info["mem_method"] = mem["mem_method"]
        if "time_s" in mem:
            info["mem_probe_time_s"] = mem["time_s"]
    benchmark.extra_info.update(info)
    benchmark.group = f"{case.suite} {case.mode} {case.dtype} {case.shape}" + (
        f" {case.extra['divergence']}" if "divergence" in case.extra else "")
