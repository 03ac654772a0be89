"""Peak memory of one benchmark case, in a fresh interpreter.

    python -m bench.memprobe '<Case as JSON>'

Builds the case's seeded inputs, runs the case once as a warm-up (compiles, lazy library
initialisation: not counted), resets the peak, runs the timed call once and prints one line
``MEMPROBE {"peak_mib": ..., "time_s": ..., "mem_method": ...}``: the peak resident memory (CPU)
or peak allocated CUDA memory above the baseline taken after the inputs exist. A fresh process
per case means nothing one case allocated or cached can hide or inflate another's peak.
"""

from __future__ import annotations

import json
import sys

from .common import Case, clear_grads, make_inputs, measure_peak, tune_glibc_malloc


def main(argv) -> int:
    tune_glibc_malloc()
    import torch

    from .impls import get_impl, runner

    case = Case.from_json(json.loads(argv[0]))
    impl = get_impl(case)
    ok, why = impl.available(torch.device(case.device).type)
    if not ok:
        print(f"not available: {why}", file=sys.stderr)
        return 3
    inputs = make_inputs(case)
    run = runner(impl, case, inputs)
    run()  # warm-up: compiles, lazy library init, thread pools; not counted
    clear_grads(inputs)
    out = measure_peak(run, torch.device(case.device))
    print("MEMPROBE " + json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
