"""The torch backend's one pass (``torch_chunked.ChunkKernels``): chunks sized by a memory budget,
one reused buffer per call, 16-bit gradient GEMMs where they are fast.

* The facts its GEMM choices rest on: this CPU build of torch has no 16-bit x 16-bit -> float32
  ``mm`` (so the float32 logits need a float32 GEMM there).
* The chunk rule (bytes per vocabulary row, a multiple of 64 rows).
* bf16 over several chunks against the float64 oracle, with the 16-bit gradient GEMMs and with the
  float32 ones (a CPU without bf16 units), soft-cap, temperature, entropy gradients, a
  log-mean-exp loss (``alpha``/``beta`` of the grad_weight accumulation); float32 likewise at the
  float32 tolerance.
"""

from __future__ import annotations

import dataclasses
import json

import oracle
import pytest
import torch

import fdiv_kernels as fk
from fdiv_kernels.kernels import chunk_sizes, torch_chunked

TOL = {torch.float32: {"rtol": 1e-5, "atol": 1e-5}, torch.bfloat16: {"rtol": 2e-2, "atol": 5e-3}}
VALUE_TOL = {torch.float32: {"rtol": 1e-5, "atol": 1e-5}, torch.bfloat16: {"rtol": 1e-4, "atol": 1e-4}}


def test_cpu_has_no_float32_output_for_16_bit_gemms():
    """If a torch release adds ``mm(..., out_dtype=float32)`` on CPU, ``_out_dtype_gemms`` should
    use it (one GEMM for the float32 logits instead of a float32 copy of the weight)."""
    a = torch.ones(4, 8, dtype=torch.bfloat16)
    with pytest.raises((RuntimeError, NotImplementedError)):
        torch.mm(a, a.T, out_dtype=torch.float32)
    assert not torch_chunked._out_dtype_gemms(torch.device("cpu"))


def test_chunk_rule_is_a_byte_budget(monkeypatch):
    monkeypatch.setattr(chunk_sizes, "TORCH_SINGLE_PASS_BYTES", 2 ** 26)
    assert chunk_sizes.torch_chunk_tokens(32000, 256, torch.float32) == 512  # 524 rows of 128 KB, rounded
    assert chunk_sizes.torch_chunk_tokens(32000, 256, torch.bfloat16) == 320  # float32 + a bf16 coefficient
    assert chunk_sizes.torch_chunk_tokens(32000, 256, torch.float64) == 256
    assert chunk_sizes.torch_chunk_tokens(10 ** 8, 256, torch.float32) == 1
    assert chunk_sizes.torch_chunk_tokens(2 ** 20, 256, torch.float32) == 16  # fewer than 64: not rounded


CASES = [
    # (rows, T, H, V, loss options, head)
    ((4,), 33, 32, 301, {"divergence": "sft"}, {}),
    ((3,), 31, 17, 257, {"divergence": "js", "beta": 0.5}, {"softcap": 5.0, "temperature": 0.8}),
    ((5,), 20, 24, 200, {"divergence": "kl", "beta": 0.3}, {}),
    ((2,), 41, 16, 129, {"divergence": "tv", "level": "sequence", "beta": 0.7}, {"temperature": 1.3}),
]


@pytest.mark.parametrize("gemms", ["16-bit-grads", "float32-grads", "out-dtype", "blocks"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("lead,t,h,v,kw,head", CASES)
def test_one_pass_over_chunks_matches_the_oracle(lead, t, h, v, kw, head, dtype, gemms, monkeypatch):
    """``out-dtype``: the CUDA code path (``gemm_chunks.mm_f32``/``addmm_f32``, whose CPU twins
    upcast) run on the CPU; ``blocks``: the weight converted and grad_weight accumulated by blocks
    of 50 rows (a weight larger than the chunk budget)."""
    if dtype == torch.float32 and gemms != "16-bit-grads":
        pytest.skip("float32 inputs have one path")
    if gemms == "blocks":
        monkeypatch.setattr(chunk_sizes, "TORCH_SINGLE_PASS_BYTES", 1)
        monkeypatch.setattr(torch_chunked, "_BLOCK_ELEMENTS", 50 * h)
    monkeypatch.setattr(torch_chunked, "_lowp_gemms_fast", lambda dt, dev: gemms != "float32-grads")
    monkeypatch.setattr(torch_chunked, "_out_dtype_gemms", lambda dev: gemms == "out-dtype")
    b = fk.kernels.backends._BACKENDS["torch"]  # chunks of 23 tokens: several per batch
    monkeypatch.setitem(fk.kernels.backends._BACKENDS, "torch", dataclasses.replace(b, chunk_tokens=lambda *a: 23))
    x = oracle.make_inputs(lead, t, h, v, dtype=dtype, bias=True, bias_scale=0.1, ignore_frac=0.1, edge_labels=True,
                           seed=v)
    hid, w, bias = x.leaves()
    ref = x.ref_per_row() if kw.get("level") == "sequence" else x.ref
    kw = dict(kw, ref_logp=None if kw["divergence"] == "sft" else ref)
    out = fk.loss(hid, w, x.labels, bias=bias, backend="torch", return_entropy=True, **head, **kw)
    mask = x.labels != oracle.IGNORE
    total = out.loss + 0.2 * (out.entropy * mask).sum()  # an entropy gradient: the recompute kernels
    grads = torch.autograd.grad(total, (hid, w, bias))
    r = oracle.leaves64(x.hidden, x.weight, x.bias)
    st = oracle.token_stats(r[0], r[1], x.labels, r[2], **head)
    want = oracle.fdiv_loss(st, x.labels, **kw)
    oracle.assert_close(out.loss, want, **VALUE_TOL[dtype], what="loss")
    want_grads = torch.autograd.grad(want + 0.2 * (st.entropy * mask).sum(), r)
    for name, a, e in zip(("hidden", "weight", "bias"), grads, want_grads):
        oracle.assert_close(a, e, **TOL[dtype], what=f"d/d{name}")


def test_auto_reads_a_measured_cpu_ranking(tmp_path, monkeypatch):
    """``backend="auto"`` on a CPU takes the order measured on this CPU model when there is one."""
    from fdiv_kernels.kernels import backends
    table = tmp_path / "measured_ranking.json"
    table.write_text(json.dumps({"devices": {backends.cpu_model_name(): {"order": ["torch", "cpu"]}}}))
    monkeypatch.setattr(backends, "MEASURED_RANKING", table)
    backends.measured_ranking.cache_clear()
    try:
        assert [b.name for b in backends.auto_order("cpu")][:2] == ["torch", "cpu"]
    finally:
        backends.measured_ranking.cache_clear()


def test_cpu_ranking_from_bench_results(tmp_path):
    """bench.rank_backends orders the fk backends of a CPU's ``make bench`` results by the geometric
    mean of their time over the fastest's, over the ``ce`` forward + backward cases all of them ran."""
    from bench.rank_backends import cpu_ranking_from

    def row(impl, dtype, t, check="ok", mode="fwdbwd"):
        case = {"suite": "ce", "impl": impl, "mode": mode, "n": 8, "h": 4, "v": 16, "dtype": dtype}
        return {"extra_info": {"case": case, "check": check}, "stats": {"min": t}}

    rows = [row("fk[cpu]", "fp32", 1.0), row("fk[torch]", "fp32", 3.0), row("fk[cpu]", "bf16", 1.0),
            row("fk[torch]", "bf16", 0.5), row("fk[cpu]", "bf16", 9.0, mode="fwd"), row("naive", "fp32", 0.1),
            row("fk[triton]", "fp32", 0.1, check="MISMATCH")]
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"datetime": "x", "benchmarks": rows,
                                "fdiv": {"provenance": {"device_type": "cpu", "cpu_model": "Some CPU"}}}))
    got = cpu_ranking_from([path])["Some CPU"]
    assert got["order"] == ["cpu", "torch"]  # cpu: 1 and 2 x the fastest; torch: 3 and 1
    assert got["x_fastest"] == {"cpu": pytest.approx(2 ** 0.5, abs=1e-3), "torch": pytest.approx(3 ** 0.5, abs=1e-3)}


@pytest.mark.parametrize("shape", [(3, 7), (64, 32000), (5, 100003)])
def test_in_place_log_softmax_matches(shape):
    """The torch backend writes log_softmax over its input on the CPU (``_log_softmax_``): the kernel
    must give the out-of-place bits, -inf entries included."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(shape, generator=g) * 8
    z[0, 1] = -torch.inf
    want = torch.log_softmax(z, 1)
    torch_chunked._log_softmax_(z)
    assert torch.equal(z, want)
