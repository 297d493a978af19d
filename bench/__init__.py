"""Benchmarks for Argon; run them all with ``python bench/run.py`` (see docs/benchmarks.md)."""
