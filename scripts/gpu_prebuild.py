"""Build the CUDA extension here, compile-only, for the GPU machine (``make gpu-prebuild``).

Run with the GPU machine's Python and torch (``.venv-gpu``: Python 3.12, torch 2.11.0+cu130, made
by ``make gpu-prebuild``); nvcc must be on PATH. Writes ``fdiv_kernels/_prebuilt/cuda/`` (the
library and ``manifest.json``: Python, torch, the sources' digest, build time), which
``fdiv_kernels.kernels.native.load("cuda")`` imports first when everything matches, and then imports
the result in a fresh interpreter (no GPU needed to import). See docs/gpu.md.

    .venv-gpu/bin/python scripts/gpu_prebuild.py [--kind cuda] [--out DIR]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def load_native():
    """fdiv_kernels/kernels/native.py by path: this venv has torch only (no transformers, numpy...)."""
    spec = importlib.util.spec_from_file_location("_fdiv_native", REPO / "fdiv_kernels" / "kernels" / "native.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


IMPORT_CHECK = r'''
import importlib.util, json, sys, torch
lib = sys.argv[1]
spec = importlib.util.spec_from_file_location(sys.argv[2], lib)
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
print(json.dumps({"torch": torch.__version__, "cuda_available": torch.cuda.is_available(),
                  "functions": sorted(n for n in dir(mod) if not n.startswith("_"))}))
'''


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kind", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--out", default=None, help="default: fdiv_kernels/_prebuilt")
    a = ap.parse_args(argv)
    native = load_native()
    os.environ.setdefault("CUDA_HOME", native.cuda_home_from_nvcc() or "")  # before cpp_extension is imported
    import torch

    print(f"gpu-prebuild: Python {sys.version.split()[0]}, torch {torch.__version__}, {a.kind} extension, "
          f"CUDA_HOME={os.environ['CUDA_HOME'] or '(none)'}, "
          f"flags {' '.join(native.NVCC_FLAGS if a.kind == 'cuda' else native.CPU_CFLAGS)}", flush=True)
    t0 = time.perf_counter()
    lib = native.prebuild(a.kind, Path(a.out) if a.out else None, build_root=REPO / "build" / "prebuild")
    took = time.perf_counter() - t0
    manifest = json.loads((lib.parent / native.MANIFEST).read_text())
    print(f"gpu-prebuild: built {lib} ({lib.stat().st_size / 2**20:.1f} MiB) in {took:.0f} s", flush=True)
    proc = subprocess.run([sys.executable, "-c", IMPORT_CHECK, str(lib), native._SPECS[a.kind]["jit"]],
                          capture_output=True, text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    if proc.returncode != 0:
        print(f"gpu-prebuild: the library does not import under this torch:\n{proc.stderr[-3000:]}", file=sys.stderr)
        return 1
    print(f"gpu-prebuild: imports in a fresh interpreter: {proc.stdout.strip()}")
    print(f"gpu-prebuild: manifest {json.dumps(manifest, sort_keys=True)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
