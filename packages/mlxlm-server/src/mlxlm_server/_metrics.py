"""Prometheus metrics, in a registry of the app's own (several apps can live in one
process, as in tests). Prefix-cache and engine figures are read at scrape time."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

__all__ = ["Metrics"]


class _Live(Collector):
    def __init__(self, read: Callable[[], dict[str, Any]]) -> None:
        self._read = read

    def collect(self) -> Iterator[Any]:
        v = self._read()
        yield GaugeMetricFamily("mlxlm_engine_up", "1 while the engine is healthy", value=v["up"])
        yield CounterMetricFamily("mlxlm_engine_restarts", "engine restarts", value=v["restarts"])
        yield GaugeMetricFamily(
            "mlxlm_requests_in_flight", "generations queued or running", value=v["in_flight"]
        )
        yield CounterMetricFamily(
            "mlxlm_prefix_cache_hits", "prompts that reused a cached prefix", value=v["hits"]
        )
        yield CounterMetricFamily(
            "mlxlm_prefix_cache_misses", "prompts with no cached prefix", value=v["misses"]
        )
        yield CounterMetricFamily(
            "mlxlm_prefix_cache_reused_tokens", "prompt tokens not recomputed", value=v["reused"]
        )
        yield GaugeMetricFamily(
            "mlxlm_prefix_cache_bytes", "bytes held by the prefix cache", value=v["bytes"]
        )
        yield GaugeMetricFamily(
            "mlxlm_prefix_cache_entries", "entries in the prefix cache", value=v["entries"]
        )


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "mlxlm_requests", "HTTP requests", ["route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "mlxlm_request_seconds", "request latency", ["route"], registry=self.registry
        )
        self.prompt_tokens = Counter("mlxlm_prompt_tokens", "prompt tokens", registry=self.registry)
        self.generated_tokens = Counter(
            "mlxlm_generated_tokens", "generated tokens", registry=self.registry
        )

    def watch(self, read: Callable[[], dict[str, Any]]) -> None:
        self.registry.register(_Live(read))

    def render(self) -> bytes:
        return generate_latest(self.registry)
