"""The streamserve benchmark harness: `make bench` or `python -m bench` (see bench/run.py and BENCHMARKS.md)."""
