"""Build description of the native extensions, used by setup.py (see docs/building.md).

* :func:`ext_modules_and_cmdclass` (only with ``FDIV_BUILD_EXT=1``): the ahead-of-time
  extensions ``fdiv_kernels._C_cpu`` (always) and ``fdiv_kernels._C_cuda`` (when nvcc and a CUDA
  build of torch are present, unless ``FDIV_BUILD_CUDA=0``), built with ninja, with the same
  sources and flags as the just-in-time build in ``fdiv_kernels/ops/native.py``.
* :func:`csrc_cmdclass`: a ``build_py`` that copies ``csrc/`` into the package as
  ``fdiv_kernels/_csrc`` so that wheels can still build just in time, and ``examples/configs``
  as ``fdiv_kernels/train/configs`` (the trainer's named configs). Imports no torch.
"""

from __future__ import annotations

import importlib.util
import os
import shutil

from setuptools.command.build_py import build_py as _build_py

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = "csrc"
SOURCE_SUFFIXES = (".cpp", ".h", ".cu", ".cuh")


def _native_spec():
    """fdiv_kernels/ops/native.py loaded by path (no package import, no torch at import)."""
    path = os.path.join(HERE, "fdiv_kernels", "ops", "native.py")
    spec = importlib.util.spec_from_file_location("_fdiv_native_build", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


#: (source folder, folder inside the package, suffixes) copied into every build as package data:
#: the C++/CUDA sources (JIT builds from a wheel) and the trainer's named configs (``--config demo``)
PACKAGE_DATA = ((CSRC, os.path.join("fdiv_kernels", "_csrc"), SOURCE_SUFFIXES),
                (os.path.join("examples", "configs"), os.path.join("fdiv_kernels", "train", "configs"),
                 (".yaml", ".yml", ".json")))


class BuildPyWithCsrc(_build_py):
    """``build_py`` that also ships :data:`PACKAGE_DATA` (``fdiv_kernels/_csrc``, ``fdiv_kernels/train/configs``)."""

    def run(self):
        super().run()
        for src, dst, suffixes in PACKAGE_DATA:
            src_root, dst_root = os.path.join(HERE, src), os.path.join(self.build_lib, dst)
            for dirpath, _, files in os.walk(src_root):
                for f in files:
                    if f.endswith(suffixes):
                        rel = os.path.relpath(os.path.join(dirpath, f), src_root)
                        os.makedirs(os.path.dirname(os.path.join(dst_root, rel)), exist_ok=True)
                        shutil.copy2(os.path.join(dirpath, f), os.path.join(dst_root, rel))


def csrc_cmdclass() -> dict:
    """cmdclass entries needed by every build (wheel or not): ship csrc/ inside the package."""
    return {"build_py": BuildPyWithCsrc}


def _want_cuda() -> bool:
    if os.environ.get("FDIV_BUILD_CUDA", "1") == "0":
        return False
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    return torch.version.cuda is not None and CUDA_HOME is not None


def ext_modules_and_cmdclass():
    """``(ext_modules, cmdclass)`` for setup(): AOT C++ (and CUDA) extensions built with ninja."""
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    native = _native_spec()
    rel = lambda srcs: [os.path.join(CSRC, s) for s in srcs]  # noqa: E731  (setuptools wants relative paths)
    exts = [CppExtension(
        name="fdiv_kernels._C_cpu",
        sources=rel(native.CPU_SOURCES),
        extra_compile_args={"cxx": list(native.CPU_CFLAGS)},
        extra_link_args=list(native.CPU_LDFLAGS),
    )]
    if _want_cuda():
        exts.append(CUDAExtension(
            name="fdiv_kernels._C_cuda",
            sources=rel(native.CUDA_SOURCES),
            extra_compile_args={"cxx": list(native.CUDA_CFLAGS), "nvcc": list(native.NVCC_FLAGS)},
        ))
    cmdclass = dict(csrc_cmdclass())
    cmdclass["build_ext"] = BuildExtension.with_options(use_ninja=True)
    return exts, cmdclass
