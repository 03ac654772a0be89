"""Benchmark suite 'dpo': chosen/rejected sequence log-probs + sigmoid DPO loss: fk vs TRL's way vs Liger's chunked DPO.

Cases come from bench/shapes.py (see bench/conftest.py); the shared body is bench/harness.py.
"""

from bench.harness import run_case

SUITE = "dpo"


def test_dpo(benchmark, case, bench_options):
    run_case(benchmark, case, bench_options)
