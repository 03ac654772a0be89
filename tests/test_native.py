"""The native-extension loader: environment-keyed JIT cache and prebuilt modules (fdiv_kernels/kernels/native.py).

The prebuilt test builds the CPU extension through the same JIT cache the CPU backend's tests use
(seconds when it is cached, ~45 s on 2 cores when not), then loads it in fresh interpreters with
just-in-time builds disabled, so only the prebuilt path can succeed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fdiv_kernels.kernels import native

REPO = Path(__file__).resolve().parent.parent


def test_environment_tag_names_python_torch_cuda_and_compilers():
    env = native.environment("cpu")
    assert env["python"] == f"{sys.version_info.major}.{sys.version_info.minor}"
    assert env["torch"] == torch.__version__
    tag = native.environment_tag(env)
    assert "/" not in tag and torch.__version__ in tag
    for key, other in (("python", "3.99"), ("torch", "9.9.9+cu999"), ("torch_cuda", "99.9"),
                       ("compilers", "gcc99.1.0-nvcc99.0")):
        assert native.environment_tag({**env, key: other}) != tag, key


def test_jit_cache_is_keyed_by_environment(monkeypatch, tmp_path):
    """Two environments sharing one TORCH_EXTENSIONS_DIR get two build directories, so neither
    rebuilds over the other's cache (issue 18, item 8)."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    here = Path(native._build_dir("fdiv_kernels_cpu", "cpu"))
    assert here.parent.parent == tmp_path and here.name == f"fdiv_kernels_cpu-{native.install_key()}"
    monkeypatch.setattr(torch, "__version__", "9.9.9+other")
    other_torch = Path(native._build_dir("fdiv_kernels_cpu", "cpu"))
    monkeypatch.undo()
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(native, "_compilers", lambda kind: "gcc99.0.0")
    other_compiler = Path(native._build_dir("fdiv_kernels_cpu", "cpu"))
    assert len({here, other_torch, other_compiler}) == 3
    assert all(p.is_dir() for p in (here, other_torch, other_compiler))


_LOAD_FROM = r'''
import json
from fdiv_kernels.kernels import native
mod = native.load("cpu")
print(json.dumps({"file": mod.__file__, "csrc": str(native.csrc_dir())}))
'''


def _load_install(csrc: Path, ext_dir: Path, tmp_path: Path) -> subprocess.Popen:
    """``native.load("cpu")`` in a fresh interpreter whose sources are ``csrc`` (see :func:`_loaded`)."""
    env = {**os.environ, "FDIV_KERNELS_CSRC": str(csrc), "TORCH_EXTENSIONS_DIR": str(ext_dir),
           "FDIV_KERNELS_PREBUILT": str(tmp_path / "no-prebuilt"), "FDIV_KERNELS_JIT": "1"}
    return subprocess.Popen([sys.executable, "-c", _LOAD_FROM], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _loaded(proc: subprocess.Popen, csrc: Path, ext_dir: Path) -> tuple:
    """(library, its mtime, stderr) of a :func:`_load_install` process."""
    out, err = proc.communicate(timeout=400)
    assert proc.returncode == 0, err[-3000:]
    result = json.loads(out.strip().splitlines()[-1])
    assert Path(result["csrc"]) == csrc and Path(result["file"]).is_relative_to(ext_dir), result
    return result["file"], os.stat(result["file"]).st_mtime_ns, err


def test_two_installs_sharing_the_cache_do_not_rebuild_each_other(tmp_path):
    """Two installs (a repository's .venv and a pip wheel, two clones: the same Python, torch and
    compiler, sources in two places) alternating on one TORCH_EXTENSIONS_DIR build once each and
    then load their own build: no silent 20-30 s rebuild at each switch (issue 26, item 6). The
    two builds run side by side (~45 s on 2 cores: each is one 30 s translation unit long)."""
    problem = native._toolchain_problem("cpu")
    if problem:
        pytest.skip(problem)
    installs = [tmp_path / name / "csrc" for name in ("venv", "wheel")]
    for csrc in installs:
        shutil.copytree(REPO / "csrc", csrc)
    ext = tmp_path / "torch_extensions"
    procs = [_load_install(csrc, ext, tmp_path) for csrc in installs]
    first = [_loaded(proc, csrc, ext) for proc, csrc in zip(procs, installs)]
    for lib, _, log in first:
        assert "compiling the C++ extension" in log and "cpu extension built in" in log, log
    assert first[0][0] != first[1][0]
    for (lib, mtime, _), csrc in zip(first, installs):
        again, again_mtime, log = _loaded(_load_install(csrc, ext, tmp_path), csrc, ext)
        assert (again, again_mtime) == (lib, mtime), f"{csrc} was rebuilt"
        assert "fdiv_kernels:" not in log, log


def test_a_rebuild_of_what_looked_cached_prints_a_line(monkeypatch, tmp_path, capsys):
    """torch rebuilds a cached extension when a header or a flag changed: that build prints a line too."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(native, "_toolchain_problem", lambda kind: None)
    build = Path(native._build_dir("fdiv_kernels_cpu", "cpu"))
    lib = build / "fdiv_kernels_cpu.so"
    lib.write_bytes(b"old")
    os.utime(lib, ns=(1 << 62, 1 << 62))  # newer than the sources: looks cached

    def fake_load(**kwargs):
        assert kwargs["build_directory"] == str(build)
        lib.write_bytes(b"new")  # torch's ninja decided otherwise
        return "module"

    from torch.utils import cpp_extension

    monkeypatch.setattr(cpp_extension, "load", fake_load)
    assert native._jit_build("cpu") == "module"
    err = capsys.readouterr().err
    assert "fdiv_kernels: cpu extension rebuilt in" in err and str(build) in err, err
    assert err.count("\n") == 1


def test_prebuilt_mismatch_names_each_difference():
    good = {"python": "3.12", "torch": "2.11.0+cu130", "sources": native.source_digest("cuda")}
    assert native.prebuilt_mismatch("cuda", good, python="3.12", torch_version="2.11.0+cu130") is None
    why = native.prebuilt_mismatch("cuda", {**good, "python": "3.11", "torch": "2.13.0", "sources": "x"},
                                   python="3.12", torch_version="2.11.0+cu130")
    assert "Python 3.11" in why and "torch 2.13.0" in why and "other sources" in why
    assert native.source_digest("cuda") != native.source_digest("cpu")


_LOAD = r'''
import json, logging, sys
logging.basicConfig(level=logging.WARNING, format="%(message)s")
from fdiv_kernels.kernels import native
try:
    mod = native.load("cpu")
except native.NativeBuildError as exc:
    print(json.dumps({"error": str(exc)}))
    sys.exit(0)
import torch, fdiv_kernels as fk
g = torch.Generator().manual_seed(0)
h, w = torch.randn(7, 5, generator=g), torch.randn(11, 5, generator=g)
y = torch.randint(0, 11, (7,), generator=g)
a = fk.token_stats(h, w, y, backend="cpu").lse
b = fk.token_stats(h, w, y, backend="torch").lse
print(json.dumps({"file": mod.__file__, "max_diff": float((a - b).abs().max())}))
'''


def _load_in_fresh_interpreter(prebuilt: Path, tmp_path: Path) -> tuple:
    env = {**os.environ, "FDIV_KERNELS_PREBUILT": str(prebuilt), "FDIV_KERNELS_JIT": "0",
           "TORCH_EXTENSIONS_DIR": str(tmp_path / "empty-jit-cache")}
    proc = subprocess.run([sys.executable, "-c", _LOAD], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def test_prebuilt_module_is_loaded_first_and_refused_when_stale(tmp_path):
    problem = native._toolchain_problem("cpu")
    if problem:
        pytest.skip(problem)
    # built through the JIT cache the CPU backend uses: no second compile when it is there
    lib = native.prebuild("cpu", tmp_path / "prebuilt", build_root=Path(native.jit_root()))
    manifest_path = lib.parent / native.MANIFEST
    manifest = json.loads(manifest_path.read_text())
    assert manifest["torch"] == torch.__version__ and manifest["sources"] == native.source_digest("cpu")

    result, _ = _load_in_fresh_interpreter(tmp_path / "prebuilt", tmp_path)
    assert Path(result["file"]).resolve() == lib.resolve(), result
    assert result["max_diff"] < 1e-4

    manifest_path.write_text(json.dumps({**manifest, "torch": "9.9.9+elsewhere"}))
    result, log = _load_in_fresh_interpreter(tmp_path / "prebuilt", tmp_path)
    assert "FDIV_KERNELS_JIT=0" in result.get("error", ""), result
    assert "not using the prebuilt cpu extension" in log and "built for torch 9.9.9+elsewhere" in log
