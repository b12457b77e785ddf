"""MoePackModel: the runtime's Python API (the CLI's `run` is a thin layer over it).

    model = MoePackModel.load("mixtral.moepack", vram="11GB")
    out = model.generate("The capital of France is", max_new_tokens=32)
    print(out.text, out.stats.decode_tokens_per_s)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from moepack.errors import MoepackError
from moepack.format import Pack
from moepack.kernels import Backend
from moepack.runtime.adaptive import AdaptiveCalibration, parse_fraction
from moepack.runtime.belady import belady, static_best
from moepack.runtime.budget import BudgetPlan, plan_budget
from moepack.runtime.cache import ExpertCache, Policy, make_policy
from moepack.runtime.executor import FALLBACK_SHARE, PREFETCH_MIN_PROB, StreamingExecutor
from moepack.runtime.model import KVCache, MoeModel, storage_dtype, widens_on
from moepack.runtime.prefetch import FatePrefetcher, parse_prefetch
from moepack.runtime.routing_trace import profiled_popularity
from moepack.runtime.sampling import TextStream, sample
from moepack.runtime.stats import RunStats, peak_device_bytes, peak_rss_bytes
from moepack.runtime.streamer import Streamer
from moepack.units import parse_size

PREFILL_CHUNK = 256  # prompt tokens per forward during prefill (bounds activation memory)


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MoepackError("--device cuda was asked for, but this torch has no CUDA device (use --device cpu)")
    return torch.device(device)


DTYPE_NAMES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
               "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(value: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    """The compute dtype: float32 on the CPU (exact) and bfloat16 on CUDA unless asked ('auto' or None)."""
    if isinstance(value, torch.dtype):
        return value
    if value is None or str(value).strip().lower() == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    name = str(value).strip().lower()
    if name not in DTYPE_NAMES:
        raise MoepackError(f"unknown compute dtype {value!r}; choose auto, float32, bfloat16 or float16")
    return DTYPE_NAMES[name]


def expert_cache(pack: Pack, slots: int, device: torch.device, policy: Policy | str = "lru", *,
                 cache_prior: bool = False) -> ExpertCache:
    """The pack's expert cache: `slots` slots of its largest expert, the policy told the model's sparse layers
    (and, with `cache_prior`, the profiled routing frequencies)."""
    return ExpertCache(slots, max(e.nbytes for e in pack.manifest.experts), device, policy,
                       layers=list(pack.spec.sparse_layer_ids),
                       popularity=profiled_popularity(pack) if cache_prior else None)


def workspace_bytes(spec, dtype: torch.dtype) -> int:
    """Activations of one prefill chunk: hidden states, attention scores, expert intermediates, logits."""
    per_token = 4 * spec.hidden_size + 3 * spec.moe_intermediate_size + spec.vocab_size + 2 * spec.num_heads * PREFILL_CHUNK
    return 2 * PREFILL_CHUNK * per_token * max(dtype.itemsize, 4)


@dataclass
class Generation:
    text: str
    tokens: list[int]
    stats: RunStats
    interrupted: bool = False


class MoePackModel:
    def __init__(self, pack: Pack, model: MoeModel, executor: StreamingExecutor, budget: BudgetPlan | None,
                 tokenizer, context: int, prefetcher: FatePrefetcher | None = None):
        self.pack, self.model, self.executor, self.budget = pack, model, executor, budget
        self.tokenizer, self.context = tokenizer, context
        self.prefetcher = prefetcher
        self.spec = model.spec

    @classmethod
    def load(cls, path: str | Path, *, vram: str | int | None = None, device: str = "auto", backend: str = "auto",
             cache_policy: str = "reuse", dtype: torch.dtype | str | None = None, context: int = 2048,
             verify: bool = True, prefetch: str = "none", prefetch_width: int | None = None,
             prefetch_min_prob: float = PREFETCH_MIN_PROB,
             adaptive_k: float | str | None = None, fallback: float | str | bool | None = FALLBACK_SHARE,
             sparse_channels: float | str | None = None, partial_loads: bool = False,
             bypass: bool = True, cache_prior: bool = False) -> MoePackModel:
        """Open a pack. `vram` bounds dense weights + KV cache + workspace + expert slots on the device
        (on the CPU it bounds the same in RAM); None keeps every expert available.

        Each technique is switchable alone: `cache_policy` lru|lfu|fate (per-layer quotas favouring shallow
        layers)|reuse (the default: evicts the expert whose next use is expected farthest away, adapting how
        fast it forgets routing to the model; with `bypass`, also on by default, it moved the fewest bytes of
        the policies on both benchmark models at every budget, docs/benchmarks.md "prefetch");
        `cache_prior`: lfu and reuse start from the pack's profiled routing frequencies (off by default: it
        measured worse, docs/benchmarks.md "prefetch"); `prefetch` none|fate
        (next-layer prediction; `prefetch_width` experts per token, default top-k; a prediction is loaded only
        if its measured hit rate is at least `prefetch_min_prob`);
        `adaptive_k` off or a threshold in (0, 1] (big-little: a token whose little half of top-k carries that
        share of its router weight runs only the little half; `fallback` off or a lower threshold: a token whose
        little half carries at least that share also runs only it when a big expert is not resident, True: every
        token may);
        `sparse_channels` off or the kept fraction of intermediate channels (FloE; `partial_loads` moves only
        up and the kept rows of gate/down on a miss instead of the whole expert, when the policy would not keep
        it); `bypass`: any miss the policy would not keep is streamed through and not cached (CUDA: one slot's
        transit buffer, counted in the workspace). `adaptive_k`, `fallback` and
        `sparse_channels` also take 'auto': per layer / per expert from the pack's profiled statistics
        (runtime/adaptive.py)."""
        prefetch = parse_prefetch(prefetch)
        big_little = parse_fraction(adaptive_k, "adaptive-k", auto=True)
        fallback = 0.0 if fallback is True else parse_fraction(fallback, "fallback", auto=True)
        sparse_keep = parse_fraction(sparse_channels, "sparse-channels", auto=True)
        pack = Pack(path)
        if "auto" in (big_little, fallback if big_little is not None else None, sparse_keep):
            auto_bl, auto_fb, auto_keep = AdaptiveCalibration.from_pack(pack).auto()  # from the profiled statistics
            big_little = auto_bl if big_little == "auto" else big_little
            fallback = auto_fb if fallback == "auto" else fallback
            sparse_keep = auto_keep if sparse_keep == "auto" else sparse_keep
        spec = pack.spec
        if isinstance(cache_policy, str):  # a bad name fails early
            make_policy(cache_policy, slots=len(pack.manifest.experts), layers=list(spec.sparse_layer_ids))
        dev = pick_device(device)
        dtype = parse_dtype(dtype, dev)
        kernel = Backend.parse(backend)
        dense = {t.name: pack.tensor(t.name, verify=verify) for t in pack.manifest.tensors}
        budget = None
        cache = streamer = None
        if vram is not None or dev.type == "cuda":
            widen = widens_on(dev, dtype, kernel)
            dense_bytes = sum(t.numel() * storage_dtype(t.dtype, t.dim(), dtype, widen).itemsize for t in dense.values())
            slot_bytes = max(e.nbytes for e in pack.manifest.experts)
            # misses that skip the cache stream through one slot's transit buffer (the CPU uses the mapped pages)
            streams = bypass or (partial_loads and sparse_keep is not None)
            transit = slot_bytes if streams and dev.type == "cuda" else 0
            budget = plan_budget(
                None if vram is None else parse_size(vram), dense_bytes=dense_bytes,
                kv_bytes=KVCache.bytes_per_token(spec, dtype) * context,
                workspace_bytes=workspace_bytes(spec, dtype) + transit,
                slot_bytes=slot_bytes, total_experts=len(pack.manifest.experts), min_slots=spec.top_k)
            cache = expert_cache(pack, budget.slots, dev, cache_policy, cache_prior=cache_prior)
            streamer = Streamer(pack, dev, slot_bytes, verify=verify)
        executor = StreamingExecutor(pack, cache, streamer, backend=kernel, big_little=big_little, fallback=fallback,
                                     sparse_keep=sparse_keep, partial_loads=partial_loads, bypass=bypass, device=dev,
                                     prefetch_min_prob=prefetch_min_prob)
        model = MoeModel(spec, dense, executor, dtype=dtype, device=dev, backend=kernel)
        prefetcher = FatePrefetcher(model, executor, width=prefetch_width) if prefetch == "fate" else None
        tokenizer = None
        if "tokenizer.json" in pack.manifest.files:
            from tokenizers import Tokenizer

            tokenizer = Tokenizer.from_file(str(pack.file_path("tokenizer.json")))
        return cls(pack, model, executor, budget, tokenizer, context, prefetcher)

    # -- tokens ------------------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise MoepackError("the pack has no tokenizer.json; pass token ids instead of text", path=self.pack.path)
        return self.tokenizer.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if self.tokenizer else " ".join(map(str, ids))

    # -- compute -----------------------------------------------------------------------------------------
    @torch.inference_mode()
    def logits(self, input_ids, cache: KVCache | None = None) -> torch.Tensor:
        """Logits [T, V] (float32, on the CPU) for a token sequence, prefilled in chunks."""
        ids = torch.as_tensor(input_ids, dtype=torch.long).flatten()
        cache = cache if cache is not None else self.model.new_cache(capacity=len(ids))
        out = [self.model.forward(ids[i:i + PREFILL_CHUNK], cache).float().cpu()
               for i in range(0, len(ids), PREFILL_CHUNK)]
        return torch.cat(out)

    @torch.inference_mode()
    def generate(self, prompt: str | list[int], *, max_new_tokens: int = 64, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int | None = None, on_text: Callable[[str], None] | None = None,
                 stop_at_eos: bool = True, forced: list[int] | None = None) -> Generation:
        """Sample up to `max_new_tokens` tokens after `prompt`. `forced`: decode these tokens instead of sampled
        ones (teacher forcing through the decode path, with the same statistics), so that configurations whose
        approximations would change the text are measured on one workload."""
        ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if forced is not None:
            max_new_tokens = len(forced)
        if not ids:
            raise MoepackError("the prompt is empty")
        if len(ids) + max_new_tokens > self.context:
            raise MoepackError(f"prompt ({len(ids)} tokens) + max_new_tokens ({max_new_tokens}) exceed the context "
                               f"of {self.context} tokens the budget was planned for; raise --context")
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        stream = TextStream(self.tokenizer, ids) if self.tokenizer else None
        stats = self._start_stats(len(ids))
        cache = self.model.new_cache(capacity=len(ids) + max_new_tokens)
        out: list[int] = []
        interrupted = False
        t0 = time.perf_counter()
        try:
            for i in range(0, len(ids), PREFILL_CHUNK):  # prefill
                logits = self.model.forward(torch.tensor(ids[i:i + PREFILL_CHUNK]), cache, last_only=True)
            before_decode = self._bytes_moved()
            self._trace_mark = len(self.executor.trace)
            t_decode = None
            for step in range(max_new_tokens):
                token = forced[step] if forced is not None else sample(logits[-1], temperature=temperature,
                                                                       top_p=top_p, generator=gen)
                if step == 0:
                    stats.ttft_s = time.perf_counter() - t0
                    t_decode = time.perf_counter()
                out.append(token)
                if stream is not None and on_text is not None:
                    on_text(stream.push(token))
                if (stop_at_eos and token in self.spec.eos_token_ids) or step == max_new_tokens - 1:
                    break
                logits = self.model.forward(torch.tensor([token]), cache)
        except KeyboardInterrupt:
            interrupted = True
        if t_decode is not None:
            stats.decode_s = time.perf_counter() - t_decode
        stats.tokens = len(out)
        stats.bytes_moved_decode = self._bytes_moved() - before_decode if out else 0
        self._finish_stats(stats)
        return Generation(self.decode(out), out, stats, interrupted)

    # -- stats ---------------------------------------------------------------------------------------------
    def _bytes_moved(self) -> int:
        cache = self.executor.cache
        return cache.stats.bytes_loaded if cache is not None else 0

    def _start_stats(self, prompt_tokens: int) -> RunStats:
        cache = self.executor.cache
        self._base = (cache.stats.hits, cache.stats.misses, cache.stats.bytes_loaded) if cache else (0, 0, 0)
        self._stall0 = self.executor.stall_s
        self._calls0 = self.executor.expert_calls
        self._prefetch0 = (cache.stats.prefetch_bytes, cache.stats.prefetch_used, cache.stats.prefetch_wasted) \
            if cache else (0, 0, 0)
        self._trace_mark = None
        self.executor.reset_counters()
        if self.prefetcher is not None:
            self.prefetcher.reset_counters()
        if self.model.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.model.device)
        return RunStats(prompt_tokens=prompt_tokens, total_experts=len(self.pack.manifest.experts),
                        expert_slots=self.budget.slots if self.budget else None, device=str(self.model.device),
                        backend=self.executor.backend.name,
                        prefetch="fate" if self.prefetcher is not None else "none")

    def _finish_stats(self, stats: RunStats) -> None:
        cache = self.executor.cache
        if cache is not None:
            stats.cache_hits = cache.stats.hits - self._base[0]
            stats.cache_misses = cache.stats.misses - self._base[1]
            stats.bytes_moved = cache.stats.bytes_loaded - self._base[2]
        stats.stall_s = self.executor.stall_s - self._stall0
        ex = self.executor
        stats.expert_calls = ex.expert_calls - self._calls0
        if self.prefetcher is not None:
            stats.prefetch_precision = self.prefetcher.score.precision
            stats.prefetch_recall = self.prefetcher.score.recall
        if cache is not None:
            stats.prefetch_bytes = cache.stats.prefetch_bytes - self._prefetch0[0]
            if self.prefetcher is not None or ex.big_little is not None:
                stats.extra["prefetch_used"] = cache.stats.prefetch_used - self._prefetch0[1]
                stats.extra["prefetch_wasted"] = cache.stats.prefetch_wasted - self._prefetch0[2]
            nbytes = lambda key: ex.records[key].nbytes  # noqa: E731
            whole = belady(ex.trace, cache.slots)
            stats.belady_hit_rate = whole.hit_rate
            mark = self._trace_mark if self._trace_mark is not None else len(ex.trace)
            stats.belady_bytes_decode = belady(ex.trace, cache.slots, nbytes=nbytes, start=mark).bytes
            stats.static_bytes_decode = static_best(ex.trace, cache.slots, nbytes=nbytes, start=mark).bytes
        tokens = max(ex.counts["tokens"], 1)
        if ex.big_little is not None:
            stats.extra["little_token_share"] = ex.counts["little_tokens"] / tokens
            stats.extra["fallback_token_share"] = ex.counts["fallback_tokens"] / tokens
        if ex.sparse_keep is not None and ex.counts["rows_total"]:
            stats.extra["channels_computed"] = ex.counts["rows_kept"] / ex.counts["rows_total"]
        if ex.bypass:
            stats.extra["streamed"] = ex.counts["streamed"]
        if ex.partial_loads:
            stats.extra["partial_loads"] = ex.counts["partial_loads"]
            stats.extra["partial_bytes_saved"] = ex.counts["partial_bytes_saved"]
            if ex.counts["partial_loads"]:
                stats.extra["partial_runs_per_load"] = ex.counts["partial_runs"] / ex.counts["partial_loads"]
        stats.peak_rss_bytes = peak_rss_bytes()
        stats.peak_device_bytes = peak_device_bytes(self.model.device)
