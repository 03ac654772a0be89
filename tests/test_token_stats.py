"""The fused primitive (torch reference backend) against float64 full-logits math."""

import os
import subprocess
import sys
import textwrap

import oracle
import pytest
import torch

import fdiv_kernels as fk
from fdiv_kernels.kernels import chunk_sizes, torch_chunked

#: this module's batch for the suite's builder: [3, 11] labels, H=17, V=53, N(0, 1) bias when asked
BATCH = {"lead": (3,), "t": 11, "h": 17, "v": 53, "ignore_frac": 0.2, "bias_scale": 1.0, "ref_scale": None}


def batch(**kw):
    return oracle.make_inputs(**{**BATCH, **kw})


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("softcap,temperature", [(None, 1.0), (5.0, 1.0), (None, 0.7), (3.0, 1.3)])
def test_values_and_grads_match_float64_oracle(bias, softcap, temperature):
    x = batch(bias=bias)
    hidden, weight, labels, b = x.hidden, x.weight, x.labels, x.bias
    leaves = [t.detach().requires_grad_() for t in (hidden, weight)] + ([b.detach().requires_grad_()] if bias else [])
    hd, wd = leaves[0], leaves[1]
    bd = leaves[2] if bias else None
    out = fk.token_stats(hd, wd, labels, bias=bd, softcap=softcap, temperature=temperature,
                         return_entropy=True, backend="torch")
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref = oracle.token_stats(ref_leaves[0], ref_leaves[1], labels, ref_leaves[2] if bias else None, softcap,
                             temperature)
    for a, r in zip(out, ref):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.double(), r, atol=2e-5, rtol=1e-5)
    # weighted sum of all three outputs exercises g, k and e at once
    g = torch.Generator().manual_seed(1)
    cg, ck, ce = (torch.randn(labels.shape, generator=g) for _ in range(3))
    grads = torch.autograd.grad((out.logp * cg + out.lse * ck + out.entropy * ce).sum(), leaves)
    ref_grads = torch.autograd.grad((ref[0] * cg + ref[1] * ck + ref[2] * ce).sum(), ref_leaves)
    for a, r in zip(grads, ref_grads):
        torch.testing.assert_close(a.double(), r, atol=2e-5, rtol=1e-4)


def test_ignored_positions_are_zero_with_no_gradient():
    x = batch()
    hidden, weight, labels = x.hidden, x.weight, x.labels
    labels[0] = -100
    hidden.requires_grad_()
    out = fk.token_stats(hidden, weight, labels)
    assert (out.logp[labels == -100] == 0).all() and (out.lse[labels == -100] == 0).all()
    (out.logp.sum() + out.lse.sum()).backward()
    assert (hidden.grad[0] == 0).all()
    assert hidden.grad[1].abs().sum() > 0


def test_custom_ignore_index_and_int32_labels():
    x = batch()
    hidden, weight, labels = x.hidden, x.weight, x.labels
    lab = torch.where(labels == -100, torch.full_like(labels, -1), labels).to(torch.int32)
    a = fk.token_stats(hidden, weight, lab, ignore_index=-1)
    b = fk.token_stats(hidden, weight, labels)
    torch.testing.assert_close(a.logp, b.logp)
    torch.testing.assert_close(a.lse, b.lse)


def test_chunking_never_exceeds_the_chunk_rule(monkeypatch):
    """Many small chunks give the same result, and no logits block exceeds torch_rows(V) * V."""
    x = batch(lead=(4,), t=25, v=40)
    hidden, weight, labels = x.hidden, x.weight, x.labels
    full = fk.token_stats(hidden, weight, labels, return_entropy=True, backend="torch")
    seen = []
    orig = torch_chunked._logits

    def spy(h, *args):
        z, t = orig(h, *args)
        seen.append(z.numel())
        return z, t

    monkeypatch.setattr(chunk_sizes, "TWO_PASS_ELEMENTS", 7 * 40)
    monkeypatch.setattr(torch_chunked, "_logits", spy)
    rows = chunk_sizes.torch_rows(40)
    assert rows == 7
    hidden.requires_grad_()
    chunked = fk.token_stats(hidden, weight, labels, return_entropy=True, backend="torch")
    chunked.logp.sum().backward()
    assert max(seen) <= rows * 40 and len(seen) > 10
    for a, b in zip(full, chunked):
        torch.testing.assert_close(a, b)


_PEAK_CODE = textwrap.dedent("""
    import resource, sys, torch, fdiv_kernels as fk
    torch.manual_seed(0)
    n, h, v = int(sys.argv[1]), 64, 8192
    hid = torch.randn(n, h, requires_grad=True); w = torch.randn(v, h, requires_grad=True)
    y = torch.randint(0, v, (n,))
    fk.token_stats(hid[:8], w, y[:8], backend="torch").logp.sum().backward()
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = fk.token_stats(hid, w, y, backend="torch")
    (out.logp.sum() + out.lse.sum()).backward()
    print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)
""")


def _peak_extra_mib(n):
    env = dict(os.environ, OMP_NUM_THREADS="2")
    res = subprocess.run([sys.executable, "-c", _PEAK_CODE, str(n)], capture_output=True, text=True, env=env, check=True)
    return float(res.stdout.strip().splitlines()[-1])


def test_peak_memory_does_not_grow_with_tokens():
    """Quadrupling N (4096 -> 16384, V=8192) must not add the 384 MiB that [N, V] fp32 logits would."""
    small, large = _peak_extra_mib(4096), _peak_extra_mib(16384)
    assert large - small < 64, f"peak extra RSS grew {small:.0f} -> {large:.0f} MiB with N"
    assert large < 320, f"peak extra RSS {large:.0f} MiB; full logits alone would need 512 MiB"


def test_gradcheck_float64():
    x = batch(lead=(2,), t=5, h=4, v=7, dtype=torch.float64, bias=True)
    hidden, weight, labels, b = x.hidden, x.weight, x.labels, x.bias
    for t in (hidden, weight, b):
        t.requires_grad_()

    def f(h, w, bb):
        out = fk.token_stats(h, w, labels, bias=bb, softcap=4.0, temperature=0.9, return_entropy=True)
        return out.logp, out.lse, out.entropy

    assert torch.autograd.gradcheck(f, (hidden, weight, b))


def test_from_logits_matches_fused_and_handles_bf16_extremes():
    x = batch()
    hidden, weight, labels = x.hidden, x.weight, x.labels
    fused = fk.token_stats(hidden, weight, labels, return_entropy=True)
    from_logits = fk.token_stats_from_logits(hidden @ weight.T, labels, return_entropy=True)
    for a, b in zip(fused, from_logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    logits = (torch.randn(4, 9, 50) * 1e4).to(torch.bfloat16).requires_grad_()
    lab = torch.randint(0, 50, (4, 9))
    out = fk.token_stats_from_logits(logits, lab)
    out.logp.sum().backward()
    assert torch.isfinite(out.logp).all() and torch.isfinite(logits.grad.float()).all()
    ref = oracle.stats(logits.detach().double(), lab)
    torch.testing.assert_close(out.logp.double(), ref[0], atol=1e-3, rtol=1e-6)


def test_bf16_error_is_no_worse_than_plain_torch_bf16():
    """CCE-style check: error vs float64 oracle within the error of plain bf16 torch (+ margin)."""
    x = batch(lead=(8,), t=16, h=64, v=300, dtype=torch.bfloat16, seed=3)
    hidden, weight, labels = x.hidden, x.weight, x.labels
    ref = oracle.token_stats(hidden, weight, labels)
    ours = fk.token_stats(hidden, weight, labels, backend="torch")
    plain = fk.token_stats_from_logits((hidden @ weight.T), labels)  # bf16 GEMM, as plain torch does
    for a, p, r in zip(ours[:2], plain[:2], ref[:2]):
        err_ours = (a.double() - r).abs().max()
        err_plain = (p.double() - r).abs().max()
        assert err_ours <= err_plain * 1.05 + 1e-6


def test_auto_backend_and_listing():
    names = fk.available_backends()
    assert names["torch"] == "available"
    x = batch()
    hidden, weight, labels = x.hidden, x.weight, x.labels
    a = fk.token_stats(hidden, weight, labels, backend="auto")
    b = fk.token_stats(hidden, weight, labels, backend="torch")
    torch.testing.assert_close(a.logp, b.logp, atol=1e-5, rtol=5e-4)
