"""Benchmarks that print JSON lines; runnable without Ray."""
