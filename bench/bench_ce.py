"""Benchmark suite 'ce': the primitive / cross-entropy: fk.token_stats per backend vs naive torch, torch.compile, Liger, CCE and the bare GEMM floor.

Cases come from bench/shapes.py (see bench/conftest.py); the shared body is bench/harness.py.
"""

from bench.harness import run_case

SUITE = "ce"


def test_ce(benchmark, case, bench_options):
    run_case(benchmark, case, bench_options)
