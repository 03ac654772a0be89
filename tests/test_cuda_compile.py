"""The CUDA backend: compile checks that run without a GPU, and runtime checks that need one.

* Every ``csrc/**/*.cu`` is compiled with ``nvcc`` (``-arch=sm_90``, and the exact flags of the JIT
  build: sm_90 code + compute_90 PTX), so a CUDA compile error fails CI on a machine without a
  GPU. Skipped, with the reason, when ``nvcc`` is not on PATH.
* ``csrc/cuda/bindings_cuda.cpp`` includes no CUDA header, so it is syntax-checked against the
  installed torch headers with the host compiler.
* With a GPU, ``backend="cuda"`` is compared with the ``"torch"`` reference (values and gradients).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig

import pytest
import torch

import fdiv_kernels as fk
from fdiv_kernels.kernels import native

CSRC = native.csrc_dir()
CU_FILES = sorted(CSRC.rglob("*.cu"))
NVCC = shutil.which("nvcc")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH: CUDA sources not compile-checked")


def test_there_are_cuda_sources():
    assert CU_FILES, f"no .cu files under {CSRC}"


@needs_nvcc
@pytest.mark.parametrize("cu", CU_FILES, ids=lambda p: str(p.relative_to(CSRC)))
def test_nvcc_compiles(cu, tmp_path):
    out = tmp_path / "k.o"
    cmd = [NVCC, "-std=c++17", "-arch=sm_90", "-c", str(cu), "-o", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}"
    assert out.stat().st_size > 0


@needs_nvcc
def test_nvcc_build_flags_embed_sm90_and_ptx(tmp_path):
    """The JIT/AOT flags give sm_90 machine code plus compute_90 PTX (for newer GPUs)."""
    cu = CSRC / "cuda" / "token_stats_epilogue.cu"
    out = tmp_path / "k.o"
    cmd = [NVCC, *native.NVCC_FLAGS, "-c", str(cu), "-o", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stderr}"
    # what nvcc embeds in the fat binary, from its own plan of the build (no cuobjdump needed)
    plan = subprocess.run([NVCC, *native.NVCC_FLAGS, "--dryrun", "-c", str(cu), "-o", str(out)],
                          capture_output=True, text=True)
    fatbin = [line for line in (plan.stdout + plan.stderr).splitlines() if "fatbinary" in line]
    assert fatbin, plan.stderr
    assert "kind=elf,sm=90" in fatbin[-1], fatbin[-1]
    assert "kind=ptx,sm=90" in fatbin[-1], fatbin[-1]


@pytest.mark.skipif(shutil.which("c++") is None, reason="no host C++ compiler")
@pytest.mark.parametrize("source", ["bindings_cuda.cpp", "distill_bindings_cuda.cpp"])
def test_cuda_binding_compiles_without_cuda_headers(source):
    from torch.utils import cpp_extension

    inc = cpp_extension.include_paths()
    cmd = ["c++", "-fsyntax-only", "-std=c++20", "-DTORCH_EXTENSION_NAME=fdiv_kernels_cuda",
           "-DTORCH_API_INCLUDE_EXTENSION_H", *[f"-isystem{p}" for p in inc],
           f"-isystem{sysconfig.get_paths()['include']}", str(CSRC / "cuda" / source)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]


# ------------------------------------------------------------------------------------------------
# Runtime (GPU only)
# ------------------------------------------------------------------------------------------------

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def _inputs(n, h, v, dtype, *, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).to("cuda", dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g) / h ** 0.5).to("cuda", dtype).requires_grad_()
    b = (torch.randn(v, generator=g) * 0.5).to("cuda", dtype).requires_grad_() if bias else None
    labels = torch.randint(0, v, (n,), generator=g)
    if n > 2:
        labels[torch.rand(n, generator=g) < 0.2] = -100
        labels[-1] = 0
    return hidden, weight, b, labels.cuda()


def _run(backend, hidden, weight, bias, labels, *, softcap, temperature, entropy):
    leaves = [t for t in (hidden, weight, bias) if t is not None]
    for t in leaves:
        t.grad = None
    out = fk.token_stats(hidden, weight, labels, bias=bias, softcap=softcap, temperature=temperature,
                         return_entropy=entropy, backend=backend)
    g = torch.Generator().manual_seed(1)
    w = [torch.randn(out.logp.shape, generator=g).cuda() for _ in range(3)]
    loss = (w[0] * out.logp).sum() + (w[1] * out.lse).sum()
    if entropy:
        loss = loss + (w[2] * out.entropy).sum()
    loss.backward()
    vals = [out.logp, out.lse] + ([out.entropy] if entropy else [])
    return [v.detach().float() for v in vals], [t.grad.float() for t in leaves]


@needs_gpu
def test_cuda_backend_is_available():
    ok, reason = fk.kernels.get_backend("cuda", "cuda").is_available()
    assert ok, reason


@needs_gpu
@pytest.mark.parametrize("shape", [(47, 31, 123), (1, 64, 50), (300, 128, 40_000)])
@pytest.mark.parametrize("softcap,temperature,entropy,bias",
                         [(None, 1.0, False, False), (None, 0.7, True, True), (20.0, 1.3, True, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_matches_torch_backend(shape, softcap, temperature, entropy, bias, dtype):
    n, h, v = shape
    args = _inputs(n, h, v, dtype, bias=bias)
    kw = dict(softcap=softcap, temperature=temperature, entropy=entropy)
    vals_c, grads_c = _run("cuda", *args, **kw)
    vals_t, grads_t = _run("torch", *args, **kw)
    if dtype == torch.float32:
        vtol = gtol = dict(atol=1e-5, rtol=5e-4)
    else:  # forward from fp32 logits of reduced-precision GEMMs; coefficient rounded to bf16/fp16
        vtol = dict(atol=2e-3, rtol=2e-3)
        gtol = dict(atol=2e-2, rtol=2e-2)
    for a, b in zip(vals_c, vals_t):
        torch.testing.assert_close(a, b, **vtol)
    for a, b in zip(grads_c, grads_t):
        scale = b.abs().max().clamp(min=1e-6)
        torch.testing.assert_close(a / scale, b / scale, **gtol)


@needs_gpu
def test_cuda_multiple_chunks(monkeypatch):
    args = _inputs(50, 32, 64, torch.float32, bias=True)
    kw = dict(softcap=3.0, temperature=1.3, entropy=True)
    one = _run("cuda", *args, **kw)
    with fk.config(gpu_chunk_bytes=6 * 7 * 64):  # 7 rows of 64 per two-pass chunk
        many = _run("cuda", *args, **kw)
    for a, b in zip(one[0] + one[1], many[0] + many[1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=5e-4)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
