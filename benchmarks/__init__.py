"""Benchmark scripts that print numbers (throughput, MFU, memory, comparisons); not tests."""
