"""pytest-benchmark suites for fdiv_kernels (see docs/benchmarks.md). Run with ``make bench``."""
