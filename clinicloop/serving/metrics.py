"""Prometheus metrics named as vLLM names them, so existing vLLM dashboards work unchanged.

One registry per app (no process-global state); gauges that mirror live state (admission, the
engine's KV cache, the log writer) and the engine's counters are read at scrape time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                    5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0)


def kv_cache_usage(cells: tuple[int, int]) -> float | None:
    """`vllm:kv_cache_usage_perc` from an engine's (cells in use, cells allocated): a share in
    [0, 1] as vLLM exports it (despite the name), or None when the engine cannot tell."""
    used, total = cells
    return used / total if total else None


class _LiveGauges(Collector):
    """Gauges read at scrape time; a value of None (unknown here) is not exported."""

    def __init__(self, read: Callable[[], dict[str, tuple[str, float | None]]],
                 model: Callable[[], str]) -> None:
        self._read = read
        self._model = model

    def collect(self) -> Iterable[GaugeMetricFamily]:
        for name, (doc, value) in self._read().items():
            if value is None:
                continue
            family = GaugeMetricFamily(name, doc, labels=["model_name"])
            family.add_metric([self._model()], value)
            yield family


_COUNTER_HELP = {
    "spec_decode_num_drafts": "Draft proposals checked by speculative decoding.",
    "spec_decode_num_draft_tokens": "Tokens proposed by speculative decoding.",
    "spec_decode_num_accepted_tokens": "Draft tokens accepted by speculative decoding.",
    "prefix_cache_queries": "Prefix cache queries, in terms of number of queried tokens.",
    "prefix_cache_hits": "Prefix cache hits, in terms of number of cached tokens.",
}


class _EngineCounters(Collector):
    def __init__(self, read: Callable[[], dict[str, int]], model: Callable[[], str]) -> None:
        self._read = read
        self._model = model

    def collect(self) -> Iterable[CounterMetricFamily]:
        for name, value in self._read().items():
            family = CounterMetricFamily(f"vllm:{name}", _COUNTER_HELP.get(name, name),
                                         labels=["model_name"])
            family.add_metric([self._model()], value)
            yield family


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        r = self.registry
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token.",
                              labels, buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("vllm:inter_token_latency_seconds",
                             "Time between streamed chunks of one request.", labels,
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram("vllm:request_queue_time_seconds",
                                    "Time a request waited for an admission slot.", labels,
                                    buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "End-to-end request latency.",
                             labels, buckets=_LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prefill tokens processed.", labels,
                                     registry=r)
        self.generation_tokens = Counter("vllm:generation_tokens", "Generated tokens.", labels,
                                         registry=r)
        self.request_success = Counter("vllm:request_success", "Finished requests.",
                                       labels + ["finished_reason"], registry=r)
        self.request_errors = Counter("clinicloop:request_errors", "Requests that failed.",
                                      labels + ["status"], registry=r)

    def watch(self, read: Callable[[], dict[str, tuple[str, float | None]]],
              model: Callable[[], str]) -> None:
        """Export live values (name -> (help, value)) at each scrape; None: not exported."""
        self.registry.register(_LiveGauges(read, model))

    def watch_counters(self, read: Callable[[], dict[str, int]],
                       model: Callable[[], str]) -> None:
        """Export an engine's cumulative counters (name -> total) as `vllm:<name>` at each
        scrape, e.g. `vllm:spec_decode_num_drafts` (`_total` in the exposition, as vLLM's)."""
        self.registry.register(_EngineCounters(read, model))

    def render(self) -> bytes:
        return generate_latest(self.registry)
