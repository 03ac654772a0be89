"""Benchmark suite 'div': fk.loss for every divergence (sequence level) vs the same math from full logits and the paper's literal Table 4 forms.

Cases come from bench/shapes.py (see bench/conftest.py); the shared body is bench/harness.py.
"""

from bench.harness import run_case

SUITE = "div"


def test_div(benchmark, case, bench_options):
    run_case(benchmark, case, bench_options)
