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

Where a module comes from, in this order:

1. a **prebuilt** module in ``$FDIV_KERNELS_PREBUILT`` (default ``fdiv_kernels/_prebuilt``,
   git-ignored; made by ``make gpu-prebuild`` for the GPU machine, see docs/gpu.md), used only
   when its ``manifest.json`` names this Python (major.minor), this torch version and the
   digest of the current sources and flags; anything else is logged and skipped;
2. the ahead-of-time module installed with ``FDIV_BUILD_EXT=1`` (``fdiv_kernels._C_*``);
3. a just-in-time build, cached per environment and install: ``<root>/<environment tag>/<name>-<install key>``,
   the tag naming Python, torch, its CUDA and the compilers (:func:`environment_tag`), the key
   hashing the sources' directory (:func:`install_key`), so that two environments or two installs
   sharing one ``$TORCH_EXTENSIONS_DIR`` never rebuild over each other's cache. Every build
   prints a line to stderr.

Build instructions: ``docs/building.md``.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import ModuleType
from functools import lru_cache
from typing import Dict, List, Optional, Tuple

if __package__:  # imported as fdiv_kernels.kernels.native
    from .. import knobs
else:  # loaded by path, without the package (setup.py, scripts/gpu_check.py): the knobs module beside it
    _spec = importlib.util.spec_from_file_location("_fdiv_knobs", Path(__file__).resolve().parents[1] / "knobs.py")
    knobs = sys.modules[_spec.name] = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(knobs)

logger = logging.getLogger("fdiv_kernels")

CPU_SOURCES = ("cpu/token_stats_cpu.cpp", "cpu/epilogue_cpu.cpp", "cpu/bindings_cpu.cpp", "cpu/distill_cpu.cpp",
               "cpu/distill_rows_cpu.cpp")
CUDA_SOURCES = ("cuda/bindings_cuda.cpp", "cuda/token_stats_epilogue.cu", "cuda/distill_bindings_cuda.cpp",
                "cuda/distill_epilogue.cu")
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


def softcap_arg(softcap: Optional[float]) -> float:
    """The extensions' soft-cap argument: the soft-cap, or 0.0 for none (Python passes ``None``)."""
    return 0.0 if softcap is None else float(softcap)


def csrc_dir() -> Path:
    """Directory holding the C++/CUDA sources.

    Looked up in order: ``$FDIV_KERNELS_CSRC``; ``fdiv_kernels/_csrc`` (copied into wheels by
    ``setup.py``'s ``build_py``); ``csrc/`` next to the package (source checkout, editable
    install).
    """
    here = Path(__file__).resolve().parent.parent  # .../fdiv_kernels
    candidates = []
    if knobs.get("csrc"):
        candidates.append(Path(knobs.get("csrc")))
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
    """Knob ``jit`` (``FDIV_KERNELS_JIT``): build just in time when no ahead-of-time module exists."""
    return bool(knobs.get("jit"))


def cuda_home_from_nvcc() -> Optional[str]:
    """The CUDA toolkit root that the ``nvcc`` on PATH runs from (its ``--dryrun`` prints it).

    torch guesses the root from nvcc's own path, which is wrong when ``nvcc`` is a wrapper
    script (``/usr/local/bin/nvcc`` exec'ing ``/usr/local/cuda-13.0/bin/nvcc``: the link then
    finds no ``libcudart``). Scripts set ``CUDA_HOME`` to this before torch's cpp_extension is
    imported; None without nvcc."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        out = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull], capture_output=True, text=True,
                             timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.MULTILINE)
    return os.path.realpath(found.group(1).strip()) if found else os.path.dirname(os.path.dirname(nvcc))


def _toolchain_problem(kind: str, *, need_device: bool = True) -> Optional[str]:
    """Why a build cannot even start (missing compiler/ninja/CUDA), or None. ``need_device=False``:
    a compile-only build (``make gpu-prebuild``), no GPU needed."""
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
        if need_device and not torch.cuda.is_available():
            return "no CUDA device is visible"
        if cpp_extension.CUDA_HOME is None:
            return "nvcc not found (set CUDA_HOME to the CUDA toolkit)"
    return None


# --------------------------------------------------------------------------------------------
# Environments: what a compiled module depends on.
# --------------------------------------------------------------------------------------------

@lru_cache(maxsize=None)
def _tool_version(cmd: Tuple[str, ...], pattern: str) -> str:
    """First match of ``pattern`` in the output of ``cmd`` (e.g. the compiler's version), or "none"."""
    try:
        out = subprocess.run(list(cmd), capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return "none"
    found = re.search(pattern, out.stdout + out.stderr)
    return found.group(1) if found else "unknown"


def _compilers(kind: str) -> str:
    """The host compiler (and nvcc for "cuda") as ``gcc12.2.0`` / ``nvcc13.0`` words."""
    cxx = os.environ.get("CXX", "c++")
    path = shutil.which(cxx)
    family = "clang" if path and "clang" in os.path.basename(os.path.realpath(path)) else "gcc"
    words = [family + (_tool_version((path, "-dumpfullversion", "-dumpversion"), r"(\d+(?:\.\d+)*)")
                       if path else "none")]
    if kind == "cuda":
        from torch.utils import cpp_extension

        nvcc = os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc") if cpp_extension.CUDA_HOME else None
        words.append("nvcc" + (_tool_version((nvcc, "--version"), r"release (\d+\.\d+)") if nvcc else "none"))
    return "-".join(words)


def environment(kind: str) -> Dict[str, str]:
    """What a module of ``kind`` built here is tied to: Python, torch (and its CUDA), compilers."""
    import torch

    return {
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda or "none",
        "compilers": _compilers(kind),
    }


def environment_tag(env: Dict[str, str]) -> str:
    """File-name-safe key of an :func:`environment`, e.g. ``py3.11-torch2.13.0+cpu-cudanone-gcc12.2.0``."""
    raw = f"py{env['python']}-torch{env['torch']}-cuda{env['torch_cuda']}-{env['compilers']}"
    return re.sub(r"[^A-Za-z0-9.+_-]", "_", raw)


def source_digest(kind: str) -> str:
    """sha256 over the sources of ``kind`` (and the headers beside them) and the build flags."""
    root = csrc_dir()
    files = sorted({root / s for s in _SPECS[kind]["sources"]}
                   | {p for s in _SPECS[kind]["sources"] for p in (root / s).parent.glob("*.h*")})
    digest = hashlib.sha256()
    for f in files:
        digest.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes() + b"\0")
    flags = CPU_CFLAGS + CPU_LDFLAGS if kind == "cpu" else CUDA_CFLAGS + NVCC_FLAGS
    digest.update(" ".join(flags).encode())
    return digest.hexdigest()


def jit_root() -> str:
    """Root of the JIT cache: ``$TORCH_EXTENSIONS_DIR`` or ``~/.cache/torch_extensions``."""
    return os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(os.path.expanduser("~"), ".cache",
                                                                  "torch_extensions")


def install_key() -> str:
    """Short hash of the sources' directory (:func:`csrc_dir`): one per install or clone.

    torch's build files name the sources by their absolute path, so two installs sharing a build
    directory (a repository's ``.venv`` and a pip wheel, two clones) would rebuild over each other
    at every switch; each gets its own directory instead."""
    return hashlib.sha256(str(csrc_dir().resolve()).encode()).hexdigest()[:10]


def _build_dir(name: str, kind: str, root: Optional[str] = None) -> str:
    """``<root>/<environment tag>/<name>-<install key>``, root :func:`jit_root` by default."""
    path = os.path.join(root or jit_root(), environment_tag(environment(kind)), f"{name}-{install_key()}")
    os.makedirs(path, exist_ok=True)
    return path


# --------------------------------------------------------------------------------------------
# Prebuilt modules (make gpu-prebuild).
# --------------------------------------------------------------------------------------------

MANIFEST = "manifest.json"


def prebuilt_dir() -> Path:
    """``$FDIV_KERNELS_PREBUILT`` or ``fdiv_kernels/_prebuilt`` (git-ignored)."""
    folder = knobs.get("prebuilt")
    return Path(folder) if folder else Path(__file__).resolve().parent.parent / "_prebuilt"


def prebuilt_mismatch(kind: str, manifest: Dict[str, str], *, python: Optional[str] = None,
                      torch_version: Optional[str] = None) -> Optional[str]:
    """Why a prebuilt module with ``manifest`` must not be loaded here (None: it may). The
    environment defaults to this one; pass ``python``/``torch_version`` to check for another."""
    if python is None or torch_version is None:
        import torch

        python = python or f"{sys.version_info.major}.{sys.version_info.minor}"
        torch_version = torch_version or torch.__version__
    problems = []
    if manifest.get("python") != python:
        problems.append(f"built for Python {manifest.get('python')}, this is {python}")
    if manifest.get("torch") != torch_version:
        problems.append(f"built for torch {manifest.get('torch')}, this is {torch_version}")
    if manifest.get("sources") != source_digest(kind):
        problems.append("built from other sources or flags (csrc/ changed since)")
    return "; ".join(problems) or None


def read_prebuilt(kind: str) -> Tuple[Optional[Path], Optional[Dict[str, str]]]:
    """``(library path, manifest)`` of the prebuilt module of ``kind``, or ``(None, None)``."""
    folder = prebuilt_dir() / kind
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None, None
    lib = folder / manifest.get("library", "")
    return (lib if lib.is_file() else None), manifest


def _import_prebuilt(kind: str) -> Optional[ModuleType]:
    lib, manifest = read_prebuilt(kind)
    if manifest is None:
        return None
    where = prebuilt_dir() / kind
    why = "its library is missing" if lib is None else prebuilt_mismatch(kind, manifest)
    if why:
        logger.warning("fdiv_kernels: not using the prebuilt %s extension in %s: %s", kind, where, why)
        return None
    import torch  # noqa: F401  (the module links against torch's libraries)

    name = _SPECS[kind]["jit"]
    try:
        spec = importlib.util.spec_from_file_location(name, str(lib))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    except ImportError as exc:
        logger.warning("fdiv_kernels: the prebuilt %s extension %s does not load (%s)", kind, lib, exc)
        return None
    logger.info("fdiv_kernels: %s extension: prebuilt %s", kind, lib)
    return mod


def prebuild(kind: str, out_root: Optional[Path] = None, *, build_root: Optional[Path] = None) -> Path:
    """Compile ``kind`` here (no GPU needed) into ``<out_root>/<kind>/`` with a manifest that
    :func:`load` checks; returns the library path. Build files go to
    ``<build_root>/<environment tag>/<name>-<install key>`` (default root ``build/prebuild`` in the source tree);
    only the library and the manifest are kept in ``out_root`` (default :func:`prebuilt_dir`)."""
    from torch.utils import cpp_extension

    problem = _toolchain_problem(kind, need_device=False)
    if problem:
        raise NativeBuildError(problem)
    spec = _SPECS[kind]
    out = Path(out_root or prebuilt_dir()) / kind
    # same layout as the JIT cache (_build_dir): build_root=$TORCH_EXTENSIONS_DIR reuses a JIT build
    build = Path(_build_dir(spec["jit"], kind, str(build_root or csrc_dir().parent / "build" / "prebuild")))
    t0 = time.perf_counter()
    cpp_extension.load(**_load_kwargs(kind, str(build)))
    seconds = time.perf_counter() - t0
    libs = sorted(build.glob(spec["jit"] + "*.so"))
    if not libs:
        raise NativeBuildError(f"the build in {build} left no {spec['jit']}*.so")
    out.mkdir(parents=True, exist_ok=True)
    target = out / libs[-1].name
    shutil.copy2(libs[-1], target)
    manifest = {**environment(kind), "kind": kind, "library": target.name, "sources": source_digest(kind),
                "flags": (" ".join(CPU_CFLAGS + CPU_LDFLAGS) if kind == "cpu" else
                          f"cxx {' '.join(CUDA_CFLAGS)}; nvcc {' '.join(NVCC_FLAGS)}"),
                "build_seconds": round(seconds, 1),
                "built_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return target


def _looks_cached(build_dir: str, srcs: List[str]) -> bool:
    libs = list(Path(build_dir).glob("*.so")) + list(Path(build_dir).glob("*.pyd"))
    if not libs:
        return False
    newest_src = max(os.path.getmtime(s) for s in srcs)
    return max(p.stat().st_mtime for p in libs) >= newest_src


def _load_kwargs(kind: str, build_dir: str) -> dict:
    """Arguments of ``torch.utils.cpp_extension.load`` for ``kind`` (JIT build and prebuild)."""
    kwargs = dict(name=_SPECS[kind]["jit"], sources=sources(kind), build_directory=build_dir, verbose=False,
                  extra_include_paths=[str(csrc_dir())])
    # copies: cpp_extension.load appends torch's libraries to the lists it is given
    if kind == "cpu":
        kwargs.update(extra_cflags=list(CPU_CFLAGS), extra_ldflags=list(CPU_LDFLAGS))
    else:
        kwargs.update(extra_cflags=list(CUDA_CFLAGS), extra_cuda_cflags=list(NVCC_FLAGS), with_cuda=True)
    return kwargs


def _jit_build(kind: str) -> ModuleType:
    from torch.utils import cpp_extension

    problem = _toolchain_problem(kind)
    if problem:
        raise NativeBuildError(problem)
    spec = _SPECS[kind]
    srcs = sources(kind)
    build_dir = _build_dir(spec["jit"], kind)
    cached = _looks_cached(build_dir, srcs)
    if not cached:
        _say(f"fdiv_kernels: compiling the {'C++' if kind == 'cpu' else 'CUDA'} extension "
             f"(first use, ~1-2 min; cached in {build_dir})...")
    before = _libraries(build_dir)
    t0 = time.perf_counter()
    kwargs = _load_kwargs(kind, build_dir)
    try:
        mod = cpp_extension.load(**kwargs)
    except Exception as exc:  # compiler errors come as RuntimeError/CalledProcessError
        raise NativeBuildError(f"building the {kind} extension failed: {exc}") from exc
    if not cached:
        _say(f"fdiv_kernels: {kind} extension built in {time.perf_counter() - t0:.0f} s")
    elif _libraries(build_dir) != before:  # torch rebuilt what looked cached (a header or a flag changed)
        _say(f"fdiv_kernels: {kind} extension rebuilt in {time.perf_counter() - t0:.0f} s (sources or flags "
             f"changed since the build cached in {build_dir})")
    return mod


def _libraries(build_dir: str) -> Dict[str, int]:
    """The built libraries of ``build_dir`` and their modification times (ns): what a build changes."""
    return {p.name: p.stat().st_mtime_ns for pattern in ("*.so", "*.pyd") for p in Path(build_dir).glob(pattern)}


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
    logger.info(msg)


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
            mod = _import_prebuilt(kind) or _import_aot(kind)
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
