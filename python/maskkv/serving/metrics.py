"""Engine statistics and their Prometheus exposition.

``EngineStats`` is plain counters the engine thread updates; ``PrometheusCollector`` reads them
at scrape time (no global registry: every server has its own ``CollectorRegistry``).

Exported (``maskkv_`` prefix): ``requests_waiting``, ``requests_running`` (gauges),
``kv_bytes_in_use``, ``kv_bytes_capacity`` (gauges: the pool's reserved and total bytes),
``step_seconds`` (histogram of engine iterations), ``output_tokens_total``,
``output_tokens_per_second`` (committed response tokens over the last ``window`` seconds),
``prompt_tokens_total``, ``requests_finished_total{reason}``, ``forward_passes_total{kind}``.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections import deque
from dataclasses import dataclass, field

__all__ = ["EngineStats", "PrometheusCollector"]

STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass
class EngineStats:
    waiting: int = 0
    running: int = 0
    kv_bytes_in_use: int = 0
    kv_bytes_capacity: int = 0
    output_tokens: int = 0
    prompt_tokens: int = 0
    iterations: int = 0
    step_count: int = 0
    step_sum: float = 0.0
    step_buckets: list[int] = field(default_factory=lambda: [0] * len(STEP_BUCKETS))
    finished: dict[str, int] = field(default_factory=dict)
    passes: dict[str, int] = field(default_factory=lambda: {"full": 0, "tail": 0})
    window: float = 10.0
    _recent: deque = field(default_factory=deque)  # (time, tokens) of recent commits
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def observe_step(self, seconds: float) -> None:
        with self._lock:
            self.step_count += 1
            self.step_sum += seconds
            i = bisect.bisect_left(STEP_BUCKETS, seconds)
            if i < len(STEP_BUCKETS):
                self.step_buckets[i] += 1

    def add_output_tokens(self, n: int) -> None:
        now = time.monotonic()
        with self._lock:
            self.output_tokens += n
            self._recent.append((now, n))
            self._trim(now)

    def finished_request(self, reason: str) -> None:
        with self._lock:
            self.finished[reason] = self.finished.get(reason, 0) + 1

    def output_tokens_per_second(self) -> float:
        now = time.monotonic()
        with self._lock:
            self._trim(now)
            return sum(n for _, n in self._recent) / self.window

    def _trim(self, now: float) -> None:
        while self._recent and self._recent[0][0] < now - self.window:
            self._recent.popleft()


class PrometheusCollector:
    """A ``prometheus_client`` collector over an engine's ``EngineStats``."""

    def __init__(self, stats: EngineStats) -> None:
        self.stats = stats

    def collect(self):
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        s = self.stats
        yield GaugeMetricFamily("maskkv_requests_waiting", "Requests in the queue", s.waiting)
        yield GaugeMetricFamily("maskkv_requests_running", "Requests admitted", s.running)
        yield GaugeMetricFamily(
            "maskkv_kv_bytes_in_use",
            "KV pool bytes reserved by admitted requests (keys, values, positions)",
            s.kv_bytes_in_use,
        )
        yield GaugeMetricFamily(
            "maskkv_kv_bytes_capacity", "KV pool size in bytes (the budget)", s.kv_bytes_capacity
        )
        with s._lock:
            cumulative, total = [], 0
            for bound, n in zip(STEP_BUCKETS, s.step_buckets):
                total += n
                cumulative.append((repr(bound), total))
            cumulative.append(("+Inf", s.step_count))
            step_sum = s.step_sum
        yield HistogramMetricFamily(
            "maskkv_step_seconds", "Engine iteration time", buckets=cumulative, sum_value=step_sum
        )
        yield CounterMetricFamily(
            "maskkv_output_tokens", "Committed response tokens", value=s.output_tokens
        )
        yield GaugeMetricFamily(
            "maskkv_output_tokens_per_second",
            f"Committed response tokens per second over the last {s.window:g} s",
            s.output_tokens_per_second(),
        )
        yield CounterMetricFamily("maskkv_prompt_tokens", "Prompt tokens admitted", s.prompt_tokens)
        finished = CounterMetricFamily(
            "maskkv_requests_finished", "Finished requests by reason", labels=["reason"]
        )
        for reason, n in sorted(s.finished.items()):
            finished.add_metric([reason], n)
        yield finished
        passes = CounterMetricFamily(
            "maskkv_forward_passes", "Forward passes by kind (per request)", labels=["kind"]
        )
        for kind, n in sorted(s.passes.items()):
            passes.add_metric([kind], n)
        yield passes
