"""Server metrics, rendered in Prometheus' text exposition format (version 0.0.4) for GET /metrics.

Counters and histograms are fed by the HTTP side (requests by endpoint and status) and by the engine thread
(tokens, queue depth, expert cache and bytes moved); one lock guards them, and rendering takes a snapshot."""

from __future__ import annotations

import threading
from bisect import bisect_left
from collections import Counter

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)  # seconds
SPEED_BUCKETS = (0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)  # tokens per second


class Histogram:
    """A cumulative histogram with fixed upper bounds (plus +Inf)."""

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, running = [], 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += n
            le = "+Inf" if bound == float("inf") else f"{bound:g}"
            out.append(f'{name}_bucket{{le="{le}"}} {running}')
        out += [f"{name}_sum {self.sum:.6g}", f"{name}_count {self.count}"]
        return out


class Metrics:
    def __init__(self, model_name: str = "model"):
        self.lock = threading.Lock()
        self.model_name = model_name
        self.requests: Counter = Counter()  # (endpoint, status) -> count
        self.rejected = 0  # refused because the queue was full
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.waiting = 0
        self.running = 0
        self.engine = {"hits": 0, "misses": 0, "bytes": 0, "bytes_decode": 0, "decode_tokens": 0, "steps": 0}
        self.engine_errors = 0
        self.ttft = Histogram(TTFT_BUCKETS)
        self.speed = Histogram(SPEED_BUCKETS)

    # -- feeding -----------------------------------------------------------------------------------------
    def request(self, endpoint: str, status: int) -> None:
        with self.lock:
            self.requests[(endpoint, status)] += 1

    def finished(self, *, prompt_tokens: int, completion_tokens: int, ttft_s: float | None,
                 decode_s: float | None) -> None:
        with self.lock:
            self.prompt_tokens += prompt_tokens
            self.completion_tokens += completion_tokens
            if ttft_s is not None:
                self.ttft.observe(ttft_s)
            if decode_s and completion_tokens > 1:
                self.speed.observe((completion_tokens - 1) / decode_s)

    def set_engine(self, totals: dict[str, int], *, waiting: int, running: int) -> None:
        with self.lock:
            self.engine = dict(totals)
            self.waiting, self.running = waiting, running

    # -- reading -----------------------------------------------------------------------------------------
    def snapshot(self) -> dict:
        with self.lock:
            e = dict(self.engine)
            accesses = e["hits"] + e["misses"]
            return {
                "waiting": self.waiting, "running": self.running, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens, **e,
                "cache_hit_rate": e["hits"] / accesses if accesses else None,
                "bytes_per_token": e["bytes_decode"] / e["decode_tokens"] if e["decode_tokens"] else None,
            }

    def render(self) -> str:
        from moepack.runtime.stats import peak_rss_bytes

        snap = self.snapshot()
        lines: list[str] = []

        def metric(name: str, kind: str, help_: str, samples: list[str]) -> None:
            lines.extend([f"# HELP {name} {help_}", f"# TYPE {name} {kind}", *samples])

        with self.lock:
            reqs = sorted(self.requests.items())
            rejected, errors = self.rejected, self.engine_errors
            ttft_lines = self.ttft.lines("moepack_time_to_first_token_seconds")
            speed_lines = self.speed.lines("moepack_decode_tokens_per_second")
        metric("moepack_requests_total", "counter", "HTTP requests by endpoint and status code.",
               [f'moepack_requests_total{{endpoint="{ep}",status="{st}"}} {n}' for (ep, st), n in reqs])
        rate, per = snap["cache_hit_rate"], snap["bytes_per_token"]
        scalars = (  # (name, kind, help, value) of the metrics with one unlabelled sample
            ("moepack_requests_rejected_total", "counter", "Requests refused because the queue was full.", rejected),
            ("moepack_engine_errors_total", "counter", "Engine steps that failed (their requests got an error).",
             errors),
            ("moepack_prompt_tokens_total", "counter", "Prompt tokens of finished requests.", snap["prompt_tokens"]),
            ("moepack_generated_tokens_total", "counter", "Tokens generated for finished requests.",
             snap["completion_tokens"]),
            ("moepack_queue_depth", "gauge", "Requests waiting for a place in the batch.", snap["waiting"]),
            ("moepack_requests_running", "gauge", "Requests in the engine's batch.", snap["running"]),
            ("moepack_engine_steps_total", "counter", "Engine steps (one forward of every sequence in flight).",
             snap["steps"]),
            ("moepack_expert_cache_hits_total", "counter", "Expert accesses served from a cache slot.", snap["hits"]),
            ("moepack_expert_cache_misses_total", "counter", "Expert accesses that had to move the expert.",
             snap["misses"]),
            ("moepack_expert_cache_hit_rate", "gauge", "Hits / accesses since the start (NaN: no budgeted cache).",
             "NaN" if rate is None else f"{rate:.6g}"),
            ("moepack_expert_bytes_moved_total", "counter", "Expert bytes moved into slots or streamed past them.",
             snap["bytes"]),
            ("moepack_expert_bytes_per_token", "gauge", "Expert bytes moved per decoded token since the start.",
             "NaN" if per is None else f"{per:.6g}"),
        )
        for name, kind, help_, value in scalars:
            metric(name, kind, help_, [f"{name} {value}"])
        metric("moepack_time_to_first_token_seconds", "histogram", "From arrival to the first generated token.",
               ttft_lines)
        metric("moepack_decode_tokens_per_second", "histogram", "Per request: tokens after the first / their time.",
               speed_lines)
        metric("moepack_peak_rss_bytes", "gauge", "Peak resident memory of the server process.",
               [f"moepack_peak_rss_bytes {peak_rss_bytes()}"])
        return "\n".join(lines) + "\n"
