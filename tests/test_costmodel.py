"""bench/costmodel.py follows the launch configuration; backend="auto" follows the model, then measurements."""

from __future__ import annotations

import json

import pytest

from bench import costmodel, rank_backends
import fdiv_kernels as fk
from fdiv_kernels.kernels import backends, chunk_sizes


def test_one_pass_paths_within_aim_and_floor_is_three_gemms():
    m = costmodel.model(8192, 4096, 128256, "bf16", "h100")
    floor = m["gemm floor"]
    assert floor["time_s"] == pytest.approx(3 * 2 * 8192 * 4096 * 128256 / costmodel.GPUS["h100"]["tensor"])
    for path in ("cuda", "triton"):  # the aim for the default (one-pass) path of every GPU backend
        assert 1.0 < m[path]["x_floor"] <= 1.25, (path, m[path]["x_floor"])
    assert m["cuda (two-pass)"]["x_floor"] > m["cuda"]["x_floor"]  # one GEMM more


def test_model_follows_the_chunk_rule(monkeypatch):
    """Smaller chunks mean more grad_weight read-modify-writes: the model must see the code's rows."""
    base = costmodel.model(8192, 4096, 128256)["cuda"]
    gemm = [k for k in base["kernels"] if k.name.startswith("grad_weight")][0]
    assert gemm.calls == 8192 // chunk_sizes.gpu_chunk_tokens(128256, 4096, None)
    with fk.config(gpu_chunk_bytes=2 ** 28):
        small = costmodel.model(8192, 4096, 128256)["cuda"]
    assert [k for k in small["kernels"] if k.name.startswith("grad_weight")][0].calls == 16
    assert small["time_s"] > base["time_s"]


def test_auto_order_is_the_cost_model_order_on_gpus():
    order = [b.name for b in backends.auto_order("cuda") if b.name in ("cuda", "triton")]
    assert order == costmodel.rank()


def test_measured_ranking_overrides_priorities(tmp_path, monkeypatch):
    result = {"date_utc": "2026-12-01T00:00:00", "device": "NVIDIA H200", "headline": [
        {"shape": "llama", "status": "ok", "impl": "fk[cuda]", "t_min": 0.040, "check": "ok"},
        {"shape": "llama", "status": "ok", "impl": "fk[triton]", "t_min": 0.036, "check": "ok"},
        {"shape": "llama", "status": "ok", "impl": "fk[triton-flash]", "t_min": 0.020, "check": "ok"},  # not a backend
        {"shape": "llama", "status": "FAILED", "impl": "fk[torch]"}]}
    path = tmp_path / "2026-12-01-gpu-check-h200.json"
    path.write_text(json.dumps(result))
    table = tmp_path / "measured_ranking.json"
    table.write_text(json.dumps({"devices": {}}))
    monkeypatch.setattr(backends, "MEASURED_RANKING", table)
    monkeypatch.setattr(rank_backends, "MEASURED_RANKING", table)
    assert rank_backends.main([str(path)]) == 0
    assert json.loads(table.read_text())["devices"]["NVIDIA H200"]["order"] == ["triton", "cuda"]
    backends.measured_ranking.cache_clear()
    monkeypatch.setattr(backends, "_device_name", lambda device_type: "NVIDIA H200")
    try:
        names = [b.name for b in backends.auto_order("cuda")]
        assert names.index("triton") < names.index("cuda")
    finally:
        backends.measured_ranking.cache_clear()
