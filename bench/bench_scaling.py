"""Benchmark suite 'scaling': time and peak memory against tokens (1k..32k) and vocabulary (32k..256k) at fixed hidden size.

Cases come from bench/shapes.py (see bench/conftest.py); the shared body is bench/harness.py.
"""

from bench.harness import run_case

SUITE = "scaling"


def test_scaling(benchmark, case, bench_options):
    run_case(benchmark, case, bench_options)
