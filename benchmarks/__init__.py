"""Cost benchmarks: a pytest-benchmark suite (`make bench`, `make bench-compare`) and `make bench-peers`."""
