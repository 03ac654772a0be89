"""Cross-check of the two CPU peak-memory methods (in-process vs a fresh subprocess).

    python -m bench.xcheck_mem        # about 3 minutes on 2 cores

Prints ``impl  in-process MiB  subprocess MiB`` for the ce suite, fwd+bwd, N=2048, H=256,
V=32000 fp32, for every implementation that runs here. The numbers of this project's run are
recorded in docs/benchmarks.md.
"""

from __future__ import annotations

import torch

from .common import Case, clear_grads, make_inputs, measure_peak, probe_in_subprocess, tune_glibc_malloc
from .impls import ce_impls, runner


def main() -> None:
    tune_glibc_malloc()
    for impl in ce_impls("cpu"):
        if not impl.available("cpu")[0]:
            continue
        case = Case("ce", impl.name, "fwdbwd", 2048, 256, 32000)
        inputs = make_inputs(case)
        run = runner(impl, case, inputs)
        run()  # warm-up
        clear_grads(inputs)
        inproc = measure_peak(run, torch.device("cpu"))["peak_mib"]
        clear_grads(inputs)
        sub = probe_in_subprocess(case.to_json())["peak_mib"]
        print(f"{impl.name:16s} {inproc:9.1f} {sub:9.1f}", flush=True)


if __name__ == "__main__":
    main()
