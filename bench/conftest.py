"""pytest-benchmark configuration for the fdiv_kernels suites.

Options:
  --bench-profile cpu|tiny   shapes of the CPU set (bench/shapes.py); the GPU set is always
                             collected, marked ``gpu``, and skipped without CUDA.
  --bench-mem inprocess|subprocess|off
                             how peak memory is measured on CPU for the ce/div/dpo suites
                             (default inprocess; scaling is always in-process; see
                             docs/benchmarks.md).

Every case is a :class:`bench.common.Case`; results go to pytest-benchmark's JSON
(``--benchmark-json``) with the case, peak memory, correctness check and provenance in each
row's ``extra_info``, and the skipped peers (with reasons) in ``output["fdiv"]["skipped"]``.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

from bench import collect
from bench.common import Case, provenance, tune_glibc_malloc
from bench.impls import impls_for
from bench.shapes import PROFILES

tune_glibc_malloc()


def pytest_addoption(parser):
    g = parser.getgroup("fdiv bench")
    g.addoption("--bench-profile", default=os.environ.get("FDIV_BENCH_PROFILE", "cpu"),
                choices=sorted(p for p in PROFILES if p != "gpu"), help="shapes of the CPU set")
    g.addoption("--bench-mem", default=os.environ.get("FDIV_BENCH_MEM", "inprocess"),
                choices=("subprocess", "inprocess", "off"), help="peak-memory method (CPU)")


_BENCH_DIR = os.path.dirname(os.path.abspath(__file__))


def pytest_ignore_collect(collection_path, config):
    """Collect the suites only when bench/ (or a file in it) was named on the command line, so a
    bare ``pytest`` at the repository root does not start 10 minutes of benchmarks."""
    named = [os.path.abspath(str(a).split("::")[0]) for a in config.invocation_params.args
             if not str(a).startswith("-")]
    if any(n == _BENCH_DIR or n.startswith(_BENCH_DIR + os.sep) for n in named):
        return None
    return True if str(collection_path).startswith(_BENCH_DIR) else None


def pytest_collect_file(file_path, parent):
    """Collect ``bench/bench_*.py`` (pytest's default pattern is ``test_*.py``)."""
    if (file_path.suffix == ".py" and file_path.name.startswith("bench_")
            and not parent.session.isinitpath(file_path)):  # explicit file arguments are collected anyway
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: the CUDA benchmark set (make bench-gpu); skipped without CUDA")
    collect.reset()
    config._fdiv_load_start = os.getloadavg()


def _cases_for(suite: str, profile: str, device: str):
    spec = PROFILES[profile]
    out = []
    if suite in ("ce", "div", "dpo"):
        for entry in spec[suite]:
            label, n, h, v, dt = entry[:5]
            seq = entry[5] if len(entry) > 5 else 0
            modes = entry[6] if len(entry) > 6 else spec[f"{suite}_modes"]
            extras = [{"shape_label": label}]
            if suite == "div":
                import fdiv_kernels as fk
                extras = [{"shape_label": label, "divergence": d} for d in fk.DIVERGENCES]
            for mode in modes:
                for extra in extras:
                    probe = Case(suite, "", mode, n, h, v, dt, device, seq, extra=extra)
                    for impl in impls_for(probe):
                        out.append(Case(suite, impl.name, mode, n, h, v, dt, device, seq, extra=extra))
    elif suite == "scaling":
        for axis in ("tokens", "vocab"):
            sc = spec[f"scaling_{axis}"]
            points = [(n, sc["v"]) for n in sc["n"]] if axis == "tokens" else [(sc["n"], v) for v in sc["v"]]
            for n, v in points:
                probe = Case(suite, "", "fwdbwd", n, sc["h"], v, "fp32" if device == "cpu" else "bf16", device)
                for impl in impls_for(probe):
                    out.append(Case(suite, impl.name, "fwdbwd", n, sc["h"], v, probe.dtype, device,
                                    extra={"axis": axis, "naive_max_logit_bytes": sc["naive_max_logit_bytes"]}))
    else:
        raise ValueError(suite)
    return out


def _case_id(c: Case) -> str:
    bits = [c.impl, c.mode, c.dtype, f"{c.n}x{c.h}x{c.v}"]
    if "divergence" in c.extra:
        bits.insert(0, str(c.extra["divergence"]))
    if "axis" in c.extra:
        bits.insert(0, str(c.extra["axis"]))
    return "-".join(bits)


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:
        return
    suite = getattr(metafunc.module, "SUITE")
    profile = metafunc.config.getoption("--bench-profile")
    params = [pytest.param(c, id=_case_id(c)) for c in _cases_for(suite, profile, "cpu")]
    params += [pytest.param(c, id="gpu-" + _case_id(c), marks=pytest.mark.gpu)
               for c in _cases_for(suite, "gpu", "cuda")]
    metafunc.parametrize("case", params)


@pytest.fixture
def bench_options(request):
    return {"profile": request.config.getoption("--bench-profile"),
            "mem": request.config.getoption("--bench-mem"),
            "rounds": PROFILES["gpu" if request.node.get_closest_marker("gpu") else
                              request.config.getoption("--bench-profile")]["rounds"]}


def pytest_benchmark_update_json(config, benchmarks, output_json):
    dev = torch.device("cuda" if (torch.cuda.is_available() and config.getoption("-m") == "gpu") else "cpu")
    args = " ".join(config.invocation_params.args)
    output_json["fdiv"] = {
        "provenance": provenance(dev, os.environ.get("FDIV_BENCH_COMMAND", f"{sys.executable} -m pytest {args}")),
        "profile": config.getoption("--bench-profile"),
        "mem_method": config.getoption("--bench-mem"),
        "skipped": collect.SKIPPED,
    }
    load = {"loadavg_1_5_15_at_start": [round(x, 2) for x in getattr(config, "_fdiv_load_start", ())],
            "loadavg_1_5_15_at_end": [round(x, 2) for x in os.getloadavg()]}
    output_json["fdiv"]["provenance"].update(load)
