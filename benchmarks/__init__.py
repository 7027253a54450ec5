"""Latency and accuracy benchmarks and reports."""
