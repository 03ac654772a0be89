"""Benchmark suite 'distill': knowledge distillation, forward + backward (issue 24).

The generalised Jensen-Shannon divergence (beta = 0.5, no hard-label term, temperature 1, mean
over the counted tokens) of a teacher (``H_t``) distilled into a student (``H_s``) over one
vocabulary, fp32 on the CPU, four implementations in the same process:

* ``fk[cpu]``: :func:`fdiv_kernels.distill_loss` on the cpu backend (both heads fused, no
  ``[N, V]`` tensor);
* ``naive``: both full logits in eager torch and TRL's ``GKDTrainer.generalized_jsd_loss``;
* ``liger``: Liger's ``LigerFusedLinearJSDLoss`` (its default ``torch.compile``d chunks);
* ``liger(compiled=False)``: the same, eager.

Each case checks its loss against the naive one (relative 1e-4), records the peak memory above
the baseline of its first timed round (in-process VmHWM - VmRSS, as bench/harness.py) and times
``rounds`` rounds of one call. Run::

    .venv/bin/python -m pytest bench/bench_distill.py --benchmark-only \\
        --benchmark-json=bench/results/DATE-cpu-distill.json
    .venv/bin/python -m bench.distill_readme bench/results/DATE-cpu-distill.json   # README row + .md table

``--bench-profile=tiny``: tiny shapes (the smoke test's).
"""

from __future__ import annotations

import functools
import gc
import os

import pytest
import torch

from bench.common import MIB, provenance, peak_rss_bytes, reset_peak_rss, rss_bytes

#: (N, H_s, H_t, V) per profile
SHAPES = {"cpu": [(2048, 512, 1024, 32000), (4096, 512, 1024, 32000)], "tiny": [(64, 16, 32, 256)]}
ROUNDS = {"cpu": 3, "tiny": 2}
IMPLS = ("fk[cpu]", "naive", "liger", "liger(compiled=False)")
BETA = 0.5


def pytest_generate_tests(metafunc):  # pragma: no cover - collection
    if "dshape" in metafunc.fixturenames:
        profile = metafunc.config.getoption("--bench-profile")
        metafunc.parametrize("dshape", SHAPES[profile], ids=lambda s: "N{}xHs{}xHt{}xV{}".format(*s))


@functools.lru_cache(maxsize=4)
def _inputs(n: int, hs: int, ht: int, v: int):
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[torch.rand(n, generator=g) < 0.1] = -100
    return {"hidden": torch.randn(n, hs, generator=g).requires_grad_(),
            "weight": (torch.randn(v, hs, generator=g) * (2.0 / hs ** 0.5)).requires_grad_(),
            "teacher_hidden": torch.randn(n, ht, generator=g),
            "teacher_weight": torch.randn(v, ht, generator=g) * (2.0 / ht ** 0.5),
            "labels": labels}


def _build(impl: str, x):
    """A zero-argument forward + backward of ``impl`` on the inputs ``x``, returning the loss."""
    h, w, th, tw, y = x["hidden"], x["weight"], x["teacher_hidden"], x["teacher_weight"], x["labels"]
    if impl == "fk[cpu]":
        import fdiv_kernels as fk

        def run():
            out = fk.distill_loss(h, w, y, teacher_hidden=th, teacher_weight=tw, divergence="js", beta=BETA,
                                  backend="cpu")
            out.loss.backward()
            return out.loss.detach()
    elif impl == "naive":
        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
        from trl.experimental.gkd.gkd_trainer import GKDTrainer

        def run():
            zs = h @ w.T
            with torch.no_grad():
                zt = th @ tw.T
            loss = GKDTrainer.generalized_jsd_loss(zs[None], zt[None], labels=y[None], beta=BETA)
            loss.backward()
            return loss.detach()
    else:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        mod = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=BETA,
                                      compiled=impl == "liger")

        def run():
            loss = mod(h, w, th, tw, y)
            loss.backward()
            return loss.detach()
    return run


@functools.lru_cache(maxsize=4)
def _reference(shape) -> float:
    x = _inputs(*shape)
    loss = float(_build("naive", x)())
    x["hidden"].grad = x["weight"].grad = None
    return loss


@pytest.mark.parametrize("impl", IMPLS)
def test_distill(benchmark, impl, dshape, request):
    profile = request.config.getoption("--bench-profile")
    x = _inputs(*dshape)
    try:
        run = _build(impl, x)
    except ImportError as e:
        pytest.skip(f"{impl}: {e}")

    def clear():
        x["hidden"].grad = x["weight"].grad = None

    ref = _reference(dshape)
    loss = float(run())  # warm-up: builds the C++ extension / compiles Liger's chunks; correctness
    clear()
    rel = abs(loss - ref) / max(abs(ref), 1e-12)
    state = {}

    def setup():
        clear()
        if "base" not in state:
            gc.collect()
            reset_peak_rss()
            state["base"] = rss_bytes()

    def target():
        run()
        if "peak" not in state:
            state["peak"] = peak_rss_bytes() - state["base"]

    benchmark.pedantic(target, setup=setup, rounds=ROUNDS[profile], iterations=1, warmup_rounds=0)
    n, hs, ht, v = dshape
    benchmark.group = f"distill js fwdbwd fp32 N={n} Hs={hs} Ht={ht} V={v}"
    benchmark.extra_info.update({
        "suite": "distill", "impl": impl, "shape": {"n": n, "hs": hs, "ht": ht, "v": v}, "loss": loss,
        "ref_loss": ref, "rel_err": rel, "check": "ok" if rel <= 1e-4 else f"MISMATCH (rel err {rel:.2e})",
        "peak_mib": max(state["peak"], 0) / MIB, "mem_method": "in-process VmHWM-VmRSS (clear_refs), first timed round",
        "provenance": provenance(torch.device("cpu"), "python -m pytest " + " ".join(request.config.invocation_params.args)),
    })
    assert rel <= 1e-4, (impl, loss, ref)
