"""Benchmarks (not tests): every figure is reported beside a floor measured in the same run."""
