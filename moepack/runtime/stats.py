"""Run statistics: what `moepack run --stats` prints and `--json` returns."""

from __future__ import annotations

import resource
import sys
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
