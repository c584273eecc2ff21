"""Kernel benchmarks, one module per op of kernels/ (`python -m bench.kernels` runs them all)."""
