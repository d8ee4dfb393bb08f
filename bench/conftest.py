"""Benchmarks run the installed lowbit; files are named bench_*.py."""
