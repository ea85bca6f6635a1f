"""Latency and throughput of dense and pruned models on every backend, next to their MACs."""
from .config import BenchConfig  # noqa: F401
