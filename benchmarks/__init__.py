"""Measurement programs, each run as ``python -m benchmarks.<name>`` (see docs/architecture.md)."""
