"""Benchmarks of single kernels and of the decode step under kernel settings."""
