"""Every Prometheus collector of the server, in one place.

Each app builds its own :class:`ServerMetrics` with its own ``CollectorRegistry`` (no module-global
registry), so several apps - e.g. in tests - never share or double-register series.

Request-path metrics (latencies, token counts, per-adapter requests) are pushed by the HTTP layer.
Engine state (queue depth, running requests, KV usage, adapters) is *pulled* at scrape time by
:class:`EngineCollector` from the ``stats()`` snapshots of the engine and the adapter service, so
the engine thread never touches Prometheus objects. The ``vllm:*`` names are exactly those the Kubernetes Gateway API
Inference Extension reads for load- and LoRA-affinity routing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from server.engine.types import ErrorKind

if TYPE_CHECKING:
    from server.bootstrap import Runtime
    from server.lora.counters import LoRACounters

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)


class EngineCollector(Collector):
    """Reads the engine's and the adapter service's ``stats()`` snapshots at scrape time; emits
    nothing engine-related while the server is still booting."""

    def __init__(self, runtime_source: Callable[[], Runtime | None]) -> None:
        self._runtime_source = runtime_source

    def describe(self) -> list[Metric]:
        return []  # dynamic: do not let the registry call collect() at registration time

    def collect(self) -> Iterator[Metric]:
        runtime = self._runtime_source()
        if runtime is None:
            return
        stats = runtime.engine.stats()
        yield _gauge("vllm:num_requests_waiting", "Requests waiting to be scheduled.", stats.num_waiting)
        yield _gauge("vllm:num_requests_running", "Requests in the running batch.", stats.num_running)
        yield _gauge(
            "vllm:kv_cache_usage_perc", "KV-cache blocks in use by requests, 1 = full.", stats.kv_cache_usage
        )
        yield _gauge(
            "loraplex_kv_cache_cached_free_perc",
            "KV-cache blocks holding a cached prefix that no request uses (reclaimable), 1 = the whole cache.",
            stats.kv_cache_cached_free,
        )
        info = GaugeMetricFamily(
            "vllm:lora_requests_info",
            "Adapters of running and waiting requests; the value is the update timestamp.",
            labels=["max_lora", "running_lora_adapters", "waiting_lora_adapters"],
        )
        info.add_metric(
            [str(stats.max_loras), ",".join(stats.running_adapters), ",".join(stats.waiting_adapters)],
            time.time(),
        )
        yield info
        yield _gauge(
            "loraplex_resident_adapters", "Adapters resident in device slots.", len(stats.resident_adapters)
        )
        yield _gauge(
            "loraplex_engine_ready", "1 once the model is loaded and warm.", float(runtime.engine.ready)
        )
        yield _gauge("loraplex_batch_size", "Sequences in the latest engine step.", stats.last_batch_size)
        for name, doc, value in (
            ("loraplex_engine_steps", "Engine iterations run.", stats.num_steps),
            ("loraplex_preemptions", "Sequences preempted for KV space.", stats.num_preemptions),
            ("loraplex_scheduled_sequences", "Sequence-steps scheduled.", stats.num_scheduled_seqs_total),
            ("loraplex_batched_tokens", "Tokens run through the model.", stats.num_batched_tokens_total),
            (
                "vllm:prefix_cache_queries",
                "Prompt tokens looked up in the prefix cache.",
                stats.prefix_cache_queries,
            ),
            ("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache.", stats.prefix_cache_hits),
        ):
            yield _counter(name, doc, value)
        yield _step_failures(stats.failed_steps)
        counters = runtime.adapters.stats()
        if counters is not None:
            yield from _adapter_metrics(counters)


_STEP_FAILURE_KINDS = (ErrorKind.INTERNAL.value, ErrorKind.OUT_OF_MEMORY.value)  # what a step raises as


def _step_failures(failed_steps: dict[str, int]) -> CounterMetricFamily:
    c = CounterMetricFamily(
        "loraplex_engine_step_failures",
        "Engine steps that raised (their requests failed, the engine went on), by kind.",
        labels=["kind"],
    )
    for kind in sorted({*_STEP_FAILURE_KINDS, *failed_steps}):
        c.add_metric([kind], failed_steps.get(kind, 0))
    return c


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    g = GaugeMetricFamily(name, doc)
    g.add_metric([], value)
    return g


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    c = CounterMetricFamily(name, doc)
    c.add_metric([], value)
    return c


_ADAPTER_COUNTERS = {  # LoRACounters field -> (metric name, help)
    "loads": ("loraplex_adapter_loads", "Adapters parsed from disk into host memory."),
    "load_failures": ("loraplex_adapter_load_failures", "Adapter loads that failed validation or reading."),
    "load_seconds": ("loraplex_adapter_load_seconds", "Time spent loading adapters from disk."),
    "activations": ("loraplex_adapter_activations", "Adapter weights copied into device slots."),
    "evictions": ("loraplex_adapter_evictions", "Adapters evicted from device slots."),
    "prefetch_fills": (
        "loraplex_adapter_prefetch_fills",
        "Device slot copies done off the engine thread, for waiting requests.",
    ),
    "slot_hits": (
        "loraplex_adapter_slot_hits",
        "Requests scheduled with their adapter already in a device slot (no copy on the critical path).",
    ),
    "slot_misses": (
        "loraplex_adapter_slot_misses",
        "Requests scheduled whose adapter had to be copied first.",
    ),
    "cpu_evictions": ("loraplex_adapter_host_evictions", "Adapters dropped from the host-memory cache."),
}


def _adapter_metrics(counters: LoRACounters) -> Iterator[Metric]:
    for field_name, (name, doc) in _ADAPTER_COUNTERS.items():
        yield _counter(name, doc, getattr(counters, field_name))


class ServerMetrics:
    """The request-path collectors plus the engine collector, in a registry owned by one app."""

    def __init__(self, runtime_source: Callable[[], Runtime | None]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "loraplex_http_requests", "HTTP requests by route and status.", ["route", "status"], registry=r
        )
        self.request_seconds = Histogram(
            "loraplex_request_duration_seconds",
            "Time from receiving a generation request to its last byte.",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft_seconds = Histogram(
            "loraplex_time_to_first_token_seconds",
            "Time from receiving a generation request to its first output token.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.itl_seconds = Histogram(
            "loraplex_inter_token_latency_seconds",
            "Time between consecutive output increments of one sequence.",
            buckets=_TOKEN_LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter("loraplex_prompt_tokens", "Prompt tokens processed.", registry=r)
        self.generation_tokens = Counter("loraplex_generation_tokens", "Tokens generated.", registry=r)
        self.adapter_requests = Counter(
            "loraplex_adapter_requests",
            "Generation requests per adapter ('' = the base model).",
            ["adapter"],
            registry=r,
        )
        self.finished = Counter(
            "loraplex_request_finished",
            "Finished sequences by finish reason.",
            ["finish_reason"],
            registry=r,
        )
        self.engine = EngineCollector(runtime_source)
        r.register(self.engine)
        self._adapter_counts: dict[str, int] = {}  # same numbers, readable without Prometheus internals

    def count_adapter_request(self, adapter: str) -> None:
        self.adapter_requests.labels(adapter=adapter).inc()
        self._adapter_counts[adapter] = self._adapter_counts.get(adapter, 0) + 1

    def adapter_request_count(self, adapter: str) -> int:
        return self._adapter_counts.get(adapter, 0)

    def forget_adapter(self, adapter: str) -> None:
        """A deleted adapter's request counter goes (a later upload under the name starts from zero):
        a server that sees many short-lived adapter names keeps no series for each one."""
        if self._adapter_counts.pop(adapter, None) is not None:
            self.adapter_requests.remove(adapter)

    def render(self) -> bytes:
        return generate_latest(self.registry)
