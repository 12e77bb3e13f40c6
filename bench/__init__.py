"""Throughput benchmarks of the ALI-G step: ``python -m bench`` (see bench/README.md)."""
