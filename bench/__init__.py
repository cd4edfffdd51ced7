"""Benchmarks of xknock's data path and control plane (run with bench/run)."""
