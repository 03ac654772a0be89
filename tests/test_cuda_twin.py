"""The CUDA backend's one-pass driver on CPU (its CPU-checkable twin) against the float64 oracle.

:class:`fdiv_kernels.kernels.cuda_backend.ChunkKernels` (chunk buffer, the bf16/fp16 coefficient
written over the float32 logits' rows, the GEMM wiring with ``alpha``/``beta``) runs here with
torch stand-ins for its two CUDA epilogues that honour the same storage contract; the epilogues
themselves are compile-checked (tests/test_cuda_compile.py) and run on a GPU there.
"""

from __future__ import annotations

import functools

import oracle
import pytest
import torch

import fdiv_kernels as fk
from fdiv_kernels.kernels import backends, chunk_sizes, cuda_backend, gemm_chunks, torch_chunked


class FakeEpilogues:
    """``chunk_forward_epilogue`` / ``chunk_coef_epilogue`` of csrc/cuda in plain torch."""

    @staticmethod
    def _z(z, bias, softcap, temperature):
        raw = z.clone() if bias is None else z + bias
        return torch_chunked.transform(raw, fk.HeadSpec(softcap if softcap > 0 else None, temperature))

    def chunk_forward_epilogue(self, z, bias, labels, softcap, temperature, return_entropy, stream):
        assert z.dtype == torch.float32 and z.stride(1) == 1
        zz, _ = self._z(z, bias, softcap, temperature)
        return torch_chunked._stats(zz, labels, return_entropy)

    def chunk_coef_epilogue(self, z, coef, bias, labels, lse, ent, g, k, e, softcap, temperature, stream):
        assert coef.shape == z.shape and coef.stride(1) == 1
        assert coef.untyped_storage().data_ptr() == z.untyped_storage().data_ptr()  # in place, row by row
        zz, t = self._z(z, bias, softcap, temperature)
        coef.copy_(torch_chunked._coef(zz, t, labels, lse, ent, g, k, e, temperature))


@pytest.fixture
def twin(monkeypatch):
    tokens = 6  # several chunks per call
    b = backends.Backend(name="cuda-twin", forward=torch_chunked.forward, backward=torch_chunked.backward,
                         device_types=("cpu",), is_available=lambda: (True, ""), priority=-100,
                         dtypes=(torch.float32, torch.bfloat16, torch.float16),
                         single_pass=functools.partial(cuda_backend.ChunkKernels, mod=FakeEpilogues()),
                         chunk_tokens=lambda v, h, dt: tokens)
    monkeypatch.setitem(backends._BACKENDS, "cuda-twin", b)
    return "cuda-twin"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kw", [dict(divergence="sft"), dict(divergence="kl", level="sequence"),
                                dict(divergence="js", values="detach"), dict(divergence="pearson", z_loss=0.01)],
                         ids=lambda kw: "-".join(map(str, kw.values())))
def test_cuda_driver_matches_autograd(twin, dtype, kw):
    x = oracle.make_inputs((3,), 7, 16, 41, seed=0, weight_scale=0.5, bias=True, bias_scale=0.1,
                           ignore_at=((1, 0), (1, 1)), ref_scale=2.0)
    hidden, weight, bias, labels, ref = x.hidden.to(dtype), x.weight.to(dtype), x.bias, x.labels, x.ref
    h, w, b = hidden.clone().requires_grad_(), weight.clone().requires_grad_(), bias.clone().requires_grad_()
    out = fk.loss(h, w, labels, bias=b.to(dtype), ref_logp=ref, beta=0.5, softcap=5.0, backend=twin, **kw)
    grads = torch.autograd.grad(out.loss, (h, w, b))
    h2, w2, b2 = oracle.leaves64(hidden, weight, bias.to(dtype))  # the bias as the backend sees it
    want = oracle.fdiv_loss(oracle.token_stats(h2, w2, labels, b2, softcap=5.0), labels, ref_logp=ref, beta=0.5, **kw)
    wgrads = torch.autograd.grad(want, (h2, w2, b2))
    torch.testing.assert_close(out.loss.double(), want, rtol=1e-5, atol=1e-5)
    # 16-bit: the coefficient is rounded to bf16 before the gradient GEMMs (as the CUDA path does)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)
    for a, c in zip(grads, wgrads):
        assert a.dtype == (dtype if a.shape != bias.shape else torch.float32)
        torch.testing.assert_close(a.double(), c, **tol)


def test_chunk_rows_follow_the_h100_rule():
    assert chunk_sizes.gpu_chunk_tokens(128256, 4096, torch.bfloat16) == 2048
    assert chunk_sizes.gpu_chunk_tokens(256000, 2304, torch.bfloat16) == 1024
    assert chunk_sizes.gpu_chunk_tokens(10 ** 7, 64, torch.bfloat16) == 256  # never below one GEMM tile row block
    for v in (32000, 50257, 128256, 151936, 256000):
        rows = chunk_sizes.gpu_chunk_tokens(v, 4096, torch.bfloat16)
        assert rows % 256 == 0 and rows * v * 4 <= max(fk.knobs.get("gpu_chunk_bytes"), 256 * v * 4)


def test_blocked_addmm_fallback_equals_fused(monkeypatch):
    """Where torch rejects addmm(out_dtype=float32) for bf16 operands, blocked GEMMs give the same."""
    g = torch.Generator().manual_seed(2)
    a = torch.randn(20, 6, generator=g).bfloat16()
    b = torch.randn(6, 5, generator=g).bfloat16()
    c0 = torch.randn(20, 5, generator=g)
    monkeypatch.setattr(gemm_chunks, "_BLOCK_ROWS", 7)
    for beta in (0.0, 0.5):
        want = beta * c0 + 2.0 * (a.float() @ b.float())
        c = c0.clone() if beta else torch.full_like(c0, float("nan"))  # beta = 0: c is not read
        gemm_chunks.blocked_addmm_f32(c, a, b, beta=beta, alpha=2.0)
        torch.testing.assert_close(c, want if beta else 2.0 * (a.float() @ b.float()))
