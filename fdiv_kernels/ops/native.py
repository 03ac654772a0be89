"""Loading the native extensions: an ahead-of-time build when installed, else a just-in-time one.

Two extensions, built from ``csrc/``:

* ``"cpu"``: ``csrc/cpu/token_stats_cpu.cpp`` + ``csrc/cpu/bindings_cpu.cpp`` (needs a C++17
  compiler and ninja); AOT module ``fdiv_kernels._C_cpu``, JIT module ``fdiv_kernels_cpu``.
* ``"cuda"``: ``csrc/cuda/bindings_cuda.cpp`` + ``csrc/cuda/token_stats_epilogue.cu`` (needs
  nvcc, a CUDA build of torch and a GPU); AOT ``fdiv_kernels._C_cuda``, JIT ``fdiv_kernels_cuda``.

:func:`load` returns the module, building it with :func:`torch.utils.cpp_extension.load` (ninja)
on first use and caching it in torch's extension directory (``$TORCH_EXTENSIONS_DIR``, default
``~/.cache/torch_extensions``), so later processes only load the cached library. Failures are
cached too and reported by :func:`status` as ``(False, reason)``. ``FDIV_KERNELS_JIT=0``
disables just-in-time builds (only an AOT module is used). Nothing is built at import time.
Build instructions: ``docs/building.md``.
"""

from __future__ import annotations

import importlib
import logging
import os
import shutil
import sys
import threading
import time
from pathlib import Path
from types import ModuleType
from typing import Dict, List, Optional, Tuple

logger = logging.getLogger("fdiv_kernels")

CPU_SOURCES = ("cpu/token_stats_cpu.cpp", "cpu/epilogue_cpu.cpp", "cpu/bindings_cpu.cpp")
CUDA_SOURCES = ("cuda/bindings_cuda.cpp", "cuda/token_stats_epilogue.cu")
CPU_CFLAGS = ["-O3", "-fopenmp"]
CPU_LDFLAGS = ["-fopenmp"]
CUDA_CFLAGS = ["-O3"]
# sm_90 machine code plus compute_90 PTX, which the driver JIT-compiles for newer GPUs
NVCC_FLAGS = ["-O3", "-std=c++17", "-lineinfo",
              "-gencode=arch=compute_90,code=sm_90", "-gencode=arch=compute_90,code=compute_90"]

_SPECS = {
    "cpu": dict(sources=CPU_SOURCES, aot="fdiv_kernels._C_cpu", jit="fdiv_kernels_cpu"),
    "cuda": dict(sources=CUDA_SOURCES, aot="fdiv_kernels._C_cuda", jit="fdiv_kernels_cuda"),
}

_lock = threading.Lock()
_modules: Dict[str, ModuleType] = {}
_failures: Dict[str, str] = {}


class NativeBuildError(RuntimeError):
    """The native extension could not be imported or built; the message says why."""


def csrc_dir() -> Path:
    """Directory holding the C++/CUDA sources.

    Looked up in order: ``$FDIV_KERNELS_CSRC``; ``fdiv_kernels/_csrc`` (copied into wheels by
    ``fdiv_build.BuildPyWithCsrc``); ``csrc/`` next to the package (source checkout, editable
    install).
    """
    here = Path(__file__).resolve().parent.parent  # .../fdiv_kernels
    candidates = []
    if os.environ.get("FDIV_KERNELS_CSRC"):
        candidates.append(Path(os.environ["FDIV_KERNELS_CSRC"]))
    candidates += [here / "_csrc", here.parent / "csrc"]
    for c in candidates:
        if (c / CPU_SOURCES[0]).is_file():
            return c
    raise NativeBuildError(f"C++ sources not found; looked in {', '.join(str(c) for c in candidates)}")


def sources(kind: str) -> List[str]:
    """Absolute paths of the sources of extension ``kind`` ("cpu" or "cuda")."""
    root = csrc_dir()
    return [str(root / s) for s in _SPECS[kind]["sources"]]


def jit_enabled() -> bool:
    return os.environ.get("FDIV_KERNELS_JIT", "1") != "0"


def _toolchain_problem(kind: str) -> Optional[str]:
    """Why a JIT build cannot even start (missing compiler/ninja/CUDA), or None."""
    from torch.utils import cpp_extension

    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return f"no C++ compiler: {cxx!r} is not on PATH (install g++ or set CXX)"
    if not cpp_extension.is_ninja_available():
        return "ninja is not installed (pip install ninja)"
    if kind == "cuda":
        import torch

        if torch.version.cuda is None:
            return f"this torch build ({torch.__version__}) has no CUDA support"
        if not torch.cuda.is_available():
            return "no CUDA device is visible"
        if cpp_extension.CUDA_HOME is None:
            return "nvcc not found (set CUDA_HOME to the CUDA toolkit)"
    return None


def _build_dir(name: str) -> str:
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if not root:
        import torch

        tag = "cu" + torch.version.cuda.replace(".", "") if torch.version.cuda else "cpu"
        root = os.path.join(os.path.expanduser("~"), ".cache", "torch_extensions",
                            f"py{sys.version_info.major}{sys.version_info.minor}_{tag}")
    path = os.path.join(root, name)
    os.makedirs(path, exist_ok=True)
    return path


def _looks_cached(build_dir: str, srcs: List[str]) -> bool:
    libs = list(Path(build_dir).glob("*.so")) + list(Path(build_dir).glob("*.pyd"))
    if not libs:
        return False
    newest_src = max(os.path.getmtime(s) for s in srcs)
    return max(p.stat().st_mtime for p in libs) >= newest_src


def _jit_build(kind: str) -> ModuleType:
    from torch.utils import cpp_extension

    problem = _toolchain_problem(kind)
    if problem:
        raise NativeBuildError(problem)
    spec = _SPECS[kind]
    srcs = sources(kind)
    build_dir = _build_dir(spec["jit"])
    cached = _looks_cached(build_dir, srcs)
    if not cached:
        msg = (f"fdiv_kernels: compiling the {'C++' if kind == 'cpu' else 'CUDA'} extension "
               f"(first use, ~1-2 min; cached in {build_dir})...")
        print(msg, file=sys.stderr, flush=True)
        logger.info(msg)
    t0 = time.perf_counter()
    kwargs = dict(name=spec["jit"], sources=srcs, build_directory=build_dir, verbose=False,
                  extra_include_paths=[str(csrc_dir())])
    if kind == "cpu":
        kwargs.update(extra_cflags=CPU_CFLAGS, extra_ldflags=CPU_LDFLAGS)
    else:
        kwargs.update(extra_cflags=CUDA_CFLAGS, extra_cuda_cflags=NVCC_FLAGS, with_cuda=True)
    try:
        mod = cpp_extension.load(**kwargs)
    except Exception as exc:  # compiler errors come as RuntimeError/CalledProcessError
        raise NativeBuildError(f"building the {kind} extension failed: {exc}") from exc
    if not cached:
        msg = f"fdiv_kernels: {kind} extension built in {time.perf_counter() - t0:.0f} s"
        print(msg, file=sys.stderr, flush=True)
        logger.info(msg)
    return mod


def _import_aot(kind: str) -> Optional[ModuleType]:
    name = _SPECS[kind]["aot"]
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name != name:
            logger.warning("fdiv_kernels: could not import %s: %s", name, exc)
        return None
    except ImportError as exc:  # present but unloadable (e.g. built against another torch)
        logger.warning("fdiv_kernels: ahead-of-time module %s does not load (%s); trying a JIT build", name, exc)
        return None


def load(kind: str) -> ModuleType:
    """The native module for ``kind`` ("cpu" or "cuda"); builds it on first use.

    Raises :class:`NativeBuildError` with the reason when it cannot be imported or built (the
    failure is cached: later calls raise at once).
    """
    if kind not in _SPECS:
        raise ValueError(f"unknown native extension {kind!r}; choose one of {sorted(_SPECS)}")
    mod = _modules.get(kind)
    if mod is not None:
        return mod
    with _lock:
        if kind in _modules:
            return _modules[kind]
        if kind in _failures:
            raise NativeBuildError(_failures[kind])
        try:
            mod = _import_aot(kind)
            if mod is None:
                if not jit_enabled():
                    raise NativeBuildError(
                        f"not built ahead of time ({_SPECS[kind]['aot']} missing) and FDIV_KERNELS_JIT=0")
                mod = _jit_build(kind)
        except NativeBuildError as exc:
            _failures[kind] = str(exc)
            logger.warning("fdiv_kernels: the %s backend is unavailable: %s", kind, _short(str(exc)))
            raise
        except Exception as exc:  # anything unexpected: report, never break the caller's import
            _failures[kind] = f"{type(exc).__name__}: {exc}"
            logger.warning("fdiv_kernels: the %s backend is unavailable: %s", kind, _short(_failures[kind]))
            raise NativeBuildError(_failures[kind]) from exc
        _modules[kind] = mod
        return mod


def status(kind: str) -> Tuple[bool, str]:
    """``(True, "")`` when the module loads (building it if needed), else ``(False, reason)``."""
    try:
        load(kind)
        return True, ""
    except NativeBuildError as exc:
        return False, _short(str(exc))


def _short(text: str, lines: int = 12) -> str:
    parts = text.strip().splitlines()
    return "\n".join(parts if len(parts) <= lines else parts[:2] + ["..."] + parts[-(lines - 3):])
