"""Benchmarks of guardmesh services; results go to ``bench/results/<service>.json``."""
