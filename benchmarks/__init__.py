"""Benchmarks: this library against the raw client on the same backend, in
the same run, alternating, reported as ratios (higher is better)."""
