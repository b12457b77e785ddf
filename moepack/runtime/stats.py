"""Run statistics: what `moepack run --stats` prints and `--json` returns."""

from __future__ import annotations

import resource
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field

import torch


def peak_rss_bytes() -> int:
    """Peak resident set size of this process. Linux: VmHWM from /proc, because ru_maxrss survives exec and so
    reports a large parent's peak in a child started by subprocess. Elsewhere ru_maxrss (bytes on macOS)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)

@dataclass
class CacheStats:
    """Counters of the expert cache (fed by runtime/cache.py)."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0
    bytes_loaded: int = 0  # every byte copied into a slot (demand and prefetch) or streamed past the cache
    bytes_loaded_decode: int = 0  # the part moved in decode steps (see EngineStats.decoding)
    prefetch_loads: int = 0
    prefetch_bytes: int = 0
    prefetch_used: int = 0  # prefetched experts hit before their eviction
    prefetch_wasted: int = 0  # prefetched experts evicted unused
    decoding: bool = False

    def moved(self, nbytes: int) -> None:
        self.bytes_loaded += nbytes
        if self.decoding:
            self.bytes_loaded_decode += nbytes

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


@dataclass
class EngineStats:
    """Everything the engine, its executor and its cache count during a run, in one object: the engine makes
    a fresh one per run (`Engine.reset_stats`), hands its parts to the executor and the cache, and renders it
    as RunStats (one prompt) or ThroughputStats (many)."""

    cache: CacheStats = field(default_factory=CacheStats)
    counts: Counter = field(default_factory=Counter)  # executor: tokens, little_tokens, rows_*, partial_*, ...
    trace: list = field(default_factory=list)  # every demand access (layer, expert) to the cache, in order
    decode_mark: int | None = None  # len(trace) when the first decode step began
    steps: int = 0
    layer_steps: int = 0  # sparse layer calls of the executor
    expert_calls: int = 0
    expert_tokens: int = 0
    loads: int = 0  # loads issued into slots (demand and prefetch)
    duplicate_loads: int = 0  # loads of an expert already loaded in the same layer step
    stall_s: float = 0.0  # compute waiting for loads
    decode_tokens: int = 0  # tokens of the decode-only steps, whose layer times follow
    decode_layer_s: float = 0.0
    decode_kernel_s: float = 0.0
    wall_s: float = 0.0

    @property
    def decoding(self) -> bool:
        return self.cache.decoding

    @decoding.setter
    def decoding(self, on: bool) -> None:
        if on and self.decode_mark is None:
            self.decode_mark = len(self.trace)
        self.cache.decoding = on

    def host_overhead_s_per_layer(self, num_layers: int) -> float | None:
        """Per decoded token and layer: layer wall time not spent inside kernels or copies."""
        if not self.decode_tokens:
            return None
        return max(0.0, self.decode_layer_s - self.decode_kernel_s) / (self.decode_tokens * num_layers)


@dataclass
class RunStats:
    prompt_tokens: int = 0
    tokens: int = 0  # generated tokens
    ttft_s: float = 0.0  # time to first token (prefill + first sample)
    decode_s: float = 0.0
    cache_hits: int = 0
    cache_misses: int = 0
    bytes_moved: int = 0
    bytes_moved_decode: int = 0
    stall_s: float = 0.0
    peak_rss_bytes: int = 0
    peak_device_bytes: int | None = None
    expert_slots: int | None = None
    total_experts: int = 0
    backend: str = ""
    device: str = ""
    expert_calls: int = 0
    prefetch: str = "none"
    prefetch_precision: float | None = None  # per token, predicted vs routed experts of the next layer
    prefetch_recall: float | None = None
    prefetch_bytes: int = 0  # part of bytes_moved
    belady_bytes_decode: int | None = None  # the optimal cache's bytes on this run's trace, same slots
    belady_hit_rate: float | None = None
    static_bytes_decode: int | None = None  # the best static cache's bytes (hindsight frequencies), same slots
    host_overhead_s_per_layer: float | None = None  # per decoded token and layer, outside kernels and copies
    extra: dict = field(default_factory=dict)

    @property
    def decode_tokens_per_s(self) -> float:
        steps = self.tokens - 1  # the first token comes from prefill
        return steps / self.decode_s if steps > 0 and self.decode_s > 0 else 0.0

    @property
    def cache_hit_rate(self) -> float:
        total = self.cache_hits + self.cache_misses
        return self.cache_hits / total if total else 1.0

    def _per_decoded_token(self, nbytes: int | None) -> float | None:
        steps = self.tokens - 1  # the first token comes from prefill
        if nbytes is None:
            return None
        return nbytes / steps if steps > 0 else 0.0

    @property
    def bytes_moved_per_token(self) -> float:
        """Expert bytes loaded per decoded token (prefill excluded: it is amortised over the prompt)."""
        return self._per_decoded_token(self.bytes_moved_decode)

    @property
    def belady_bytes_per_token(self) -> float | None:
        """Lower bound of bytes_moved_per_token for this budget: Belady's MIN on the same routing trace."""
        return self._per_decoded_token(self.belady_bytes_decode)

    @property
    def static_bytes_per_token(self) -> float | None:
        """The best static cache's bytes per decoded token (belady.static_best): under independent routing no
        online policy can expect fewer."""
        return self._per_decoded_token(self.static_bytes_decode)

    def to_json(self) -> dict:
        out = asdict(self)
        out.update(decode_tokens_per_s=self.decode_tokens_per_s, cache_hit_rate=self.cache_hit_rate,
                   bytes_moved_per_token=self.bytes_moved_per_token,
                   belady_bytes_per_token=self.belady_bytes_per_token,
                   static_bytes_per_token=self.static_bytes_per_token)
        out.update(out.pop("extra"))
        return out


def peak_device_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return None


@dataclass
class SequenceResult:
    index: int
    prompt_tokens: int
    tokens: list[int]
    text: str
    latency_s: float  # from the start of the run to this prompt's last token
    ttft_s: float  # from the start of the run to its first token
    queued_s: float  # from the start of the run until it entered a batch


@dataclass
class ThroughputStats:
    """Many prompts through the engine at once (`moepack run --prompts`)."""

    prompts: int = 0
    batches: int = 0
    batch_size: int = 1
    generated_tokens: int = 0
    prompt_tokens: int = 0
    wall_s: float = 0.0
    steps: int = 0  # engine steps (every sequence in flight advanced once)
    layer_steps: int = 0
    stall_s: float = 0.0
    load_s: float = 0.0  # loader busy time (CPU copies)
    loads: int = 0
    bytes_moved: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    expert_calls: int = 0
    expert_tokens: int = 0
    prefetch_issued: int = 0
    prefetch_used: int = 0
    prefetch_wasted: int = 0
    duplicate_loads: int = 0
    expert_slots: int = 0
    hot_experts: int = 0
    host_overhead_s_per_layer: float | None = None
    latencies_s: list[float] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def stall_fraction(self) -> float:
        return self.stall_s / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def mean_latency_s(self) -> float:
        return sum(self.latencies_s) / len(self.latencies_s) if self.latencies_s else 0.0

    @property
    def loads_per_layer_step(self) -> float:
        return self.loads / max(1, self.layer_steps)

    @property
    def cache_hit_rate(self) -> float:
        total = self.cache_hits + self.cache_misses
        return self.cache_hits / total if total else 1.0

    def to_json(self) -> dict:
        out = asdict(self)
        out.update(tokens_per_s=self.tokens_per_s, stall_fraction=self.stall_fraction,
                   mean_latency_s=self.mean_latency_s, cache_hit_rate=self.cache_hit_rate)
        return out
