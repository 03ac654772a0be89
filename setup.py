"""The build steps of fdiv_kernels that need code; the metadata is in pyproject.toml.

* ``build_py`` also copies ``csrc/`` into the package as ``fdiv_kernels/_csrc`` (so that a wheel
  can still build the native backends just in time) and ``examples/configs`` as
  ``fdiv_kernels/train/configs`` (the trainer's named configs). Imports no torch.
* With ``FDIV_BUILD_EXT=1``, the ahead-of-time extensions ``fdiv_kernels._C_cpu`` (always) and
  ``fdiv_kernels._C_cuda`` (when nvcc and a CUDA build of torch are present, unless
  ``FDIV_BUILD_CUDA=0``), built with ninja from the sources and flags of the just-in-time build
  (``fdiv_kernels/kernels/native.py``). See docs/building.md.

Install on a CPU machine (never pulls a CUDA torch): ``make install``, or

    pip install -c constraints.txt torch
    pip install -c constraints.txt --no-build-isolation -e ".[dev]"
"""

import importlib.util
import os
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = "csrc"
SOURCE_SUFFIXES = (".cpp", ".h", ".cu", ".cuh")

#: (source folder, folder inside the package, suffixes) copied into every build as package data:
#: the C++/CUDA sources (JIT builds from a wheel) and the trainer's named configs (``--config demo``)
PACKAGE_DATA = ((CSRC, os.path.join("fdiv_kernels", "_csrc"), SOURCE_SUFFIXES),
                (os.path.join("examples", "configs"), os.path.join("fdiv_kernels", "train", "configs"),
                 (".yaml", ".yml", ".json")))


class BuildPyWithData(build_py):
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


def _native_build_description():
    """fdiv_kernels/kernels/native.py (sources and flags) loaded by path: no package import, no torch."""
    spec = importlib.util.spec_from_file_location("_fdiv_native_build", os.path.join(HERE, "fdiv_kernels", "kernels",
                                                                                     "native.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _want_cuda() -> bool:
    if os.environ.get("FDIV_BUILD_CUDA", "1") == "0":
        return False
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    return torch.version.cuda is not None and CUDA_HOME is not None


def _relative(sources):
    """setuptools wants source paths relative to this folder."""
    return [os.path.join(CSRC, s) for s in sources]


def ahead_of_time_extensions():
    """``(ext_modules, cmdclass)`` of the AOT C++ (and CUDA) extensions, built with ninja."""
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    native = _native_build_description()
    exts = [CppExtension(
        name="fdiv_kernels._C_cpu",
        sources=_relative(native.CPU_SOURCES),
        extra_compile_args={"cxx": list(native.CPU_CFLAGS)},
        extra_link_args=list(native.CPU_LDFLAGS),
    )]
    if _want_cuda():
        exts.append(CUDAExtension(
            name="fdiv_kernels._C_cuda",
            sources=_relative(native.CUDA_SOURCES),
            extra_compile_args={"cxx": list(native.CUDA_CFLAGS), "nvcc": list(native.NVCC_FLAGS)},
        ))
    return exts, {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = ahead_of_time_extensions() if os.environ.get("FDIV_BUILD_EXT", "0") == "1" else ([], {})
setup(ext_modules=ext_modules, cmdclass={"build_py": BuildPyWithData, **cmdclass})
