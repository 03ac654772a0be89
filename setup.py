"""Packaging for fdiv_kernels.

Install on a CPU machine (never pulls a CUDA torch):

    pip install -c constraints.txt torch
    pip install -c constraints.txt --no-build-isolation -e ".[dev]"

Native extensions are built just in time on first use (ninja); see docs/building.md for the
ahead-of-time build (FDIV_BUILD_EXT=1).
"""

import os
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def _ext_modules():
    """Ahead-of-time native build, only when asked for (FDIV_BUILD_EXT=1); see docs/building.md."""
    if os.environ.get("FDIV_BUILD_EXT", "0") != "1":
        return [], {}
    from fdiv_build import ext_modules_and_cmdclass  # noqa: E402  (csrc/ build description)
    return ext_modules_and_cmdclass()


ext_modules, cmdclass = _ext_modules()
from fdiv_build import csrc_cmdclass  # noqa: E402  (ships csrc/ inside the package for JIT builds)

cmdclass = {**csrc_cmdclass(), **cmdclass}

def _version() -> str:
    """``__version__`` of fdiv_kernels/__init__.py (one definition; read without importing torch)."""
    import re

    with open(os.path.join(HERE, "fdiv_kernels", "__init__.py"), encoding="utf-8") as f:
        return re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)


TEST = ["pytest>=8", "pytest-benchmark>=4", "hypothesis>=6", "mpmath>=1.3", "ninja"]
PEERS = ["liger-kernel>=0.5", "cut-cross-entropy>=25.1"]
# tested with 3.6 (the GPU machine's) and 3.9 (the dev pin); fdiv_kernels.ops.triton_backend.MIN_TRITON
TRITON = "triton>=3.6"

LOGGING = {"tensorboard": ["tensorboard>=2.10"], "wandb": ["wandb>=0.16"]}

setup(
    name="fdiv-kernels",
    version=_version(),
    description="Fused, numerically stable f-divergence and DPO losses for LLM post-training (CUDA, Triton, C++)",
    long_description=open(os.path.join(HERE, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    author="The fdiv_kernels authors",
    license="Apache-2.0",
    license_files=["LICENSE"],
    keywords=["f-divergence", "DPO", "SFT", "fused loss", "LLM", "post-training", "pytorch", "triton", "cuda"],
    classifiers=[
        "Development Status :: 3 - Alpha",
        "Intended Audience :: Science/Research",
        "License :: OSI Approved :: Apache Software License",
        "Programming Language :: Python :: 3",
        "Programming Language :: C++",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
    python_requires=">=3.10",
    packages=find_packages(include=["fdiv_kernels", "fdiv_kernels.*"]),
    include_package_data=True,
    package_data={"fdiv_kernels.ops": ["measured_ranking.json"]},
    install_requires=[
        "torch>=2.13",
        "numpy",
        "tqdm",
        "pyyaml",
        "safetensors",
        "transformers>=4.46",
        "matplotlib",
    ],
    extras_require={
        "triton": [TRITON],
        "trl": ["trl>=1.0", "datasets", "accelerate"],
        "deepspeed": ["deepspeed"],
        **LOGGING,
        "peers": PEERS,
        "dev": TEST + PEERS + LOGGING["tensorboard"] + [TRITON, "trl>=1.0", "datasets", "accelerate", "deepspeed"],
    },
    entry_points={
        "console_scripts": [
            "fdiv-train=fdiv_kernels.train.cli:main",
            "fdiv-analyze=fdiv_kernels.analysis.cli:main",
        ]
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
