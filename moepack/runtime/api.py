"""MoePackModel: the runtime's Python API (the CLI's `run` is a thin layer over it).

    model = MoePackModel.load("mixtral.moepack", vram="11GB")
    out = model.generate("The capital of France is", max_new_tokens=32)
    print(out.text, out.stats.decode_tokens_per_s)
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from moepack.errors import BudgetError, MoepackError
from moepack.format import Pack
from moepack.kernels import Backend, kernel_name
from moepack.runtime.adaptive import AdaptiveCalibration
from moepack.runtime.belady import belady, static_best
from moepack.runtime.budget import PREFILL_CHUNK, BudgetPlan, MemoryNeeds, plan_budget
from moepack.runtime.cache import ExpertCache, Policy
from moepack.runtime.config import RunConfig
from moepack.runtime.engine import Engine
from moepack.runtime.executor import StreamingExecutor
from moepack.runtime.expert_compute import ExpertTerms
from moepack.runtime.model import KVCache, MoeModel
from moepack.runtime.prefetch import FatePrefetcher
from moepack.runtime.routing_trace import profiled_popularity
from moepack.runtime.sampling import TextStream
from moepack.runtime.stats import EngineStats, RunStats, peak_device_bytes, peak_rss_bytes
from moepack.runtime.streamer import Streamer
from moepack.units import format_size


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


def check_context(spec, context: int) -> None:
    """A context past the model's positions is warned about once (every supported RoPE still computes
    there, but an unscaled one degrades past its trained length)."""
    limit = spec.max_position_embeddings
    if not limit or context <= limit:
        return
    if spec.rope.type in ("default", None):
        warn_once(f"context of {context} tokens exceeds the model's {limit} trained positions; text past "
                  f"them degrades (its RoPE has no scaling)")
    else:
        warn_once(f"context of {context} tokens exceeds the model's {limit} positions ({spec.rope.type} RoPE "
                  f"scaling); quality past them is not guaranteed")


def check_memory(needs: MemoryNeeds, device: torch.device, *, context: int, sequences: int) -> None:
    """Without --vram nothing bounds the KV cache: refuse one that cannot fit the memory there is."""
    kv = sequences * context * needs.kv_bytes_per_token
    available = available_memory(device)
    if available is not None and kv + needs.dense_bytes > available:
        raise BudgetError(f"--context {context}: the KV cache alone needs {format_size(kv)}, more than the "
                          f"{format_size(available)} of memory available on {device}; shorten --context")


def available_memory(device: torch.device) -> int | None:
    """Bytes free for new allocations on the device (None where it cannot be told)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


_warned: set[str] = set()


def warn_once(message: str) -> None:
    """A warning on stderr, once per process and message."""
    if message not in _warned:
        _warned.add(message)
        print(f"warning: {message}", file=sys.stderr)


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
    def load(cls, path: str | Path, config: RunConfig | None = None, /, **options) -> MoePackModel:
        """Open a pack for `config` (a `RunConfig`; or its options as keywords, e.g. `vram="11GB"`,
        `cache_policy="lru"`, `adaptive_k="auto"`; keywords beside a config override it). See
        runtime/config.py for every option. `vram` bounds dense weights + KV caches + workspace + expert
        slots on the device (on the CPU the same in RAM); None keeps every expert available."""
        if config is None:
            config = RunConfig.build(**options)
        elif options:
            config = RunConfig.build(**{**config.to_json(), **options})
        if config.threads is not None:
            torch.set_num_threads(config.threads)
        pack = Pack(path)
        spec = pack.spec  # checked against the tensors and experts the pack holds
        tokenizer = pack.tokenizer()  # validated: a regular file inside the pack, ids within the vocabulary
        big_little, fallback, sparse_keep = config.adaptive_k, config.fallback_share, config.sparse_channels
        if "auto" in (big_little, fallback, sparse_keep):
            auto_bl, auto_fb, auto_keep = AdaptiveCalibration.from_pack(pack).auto()  # the profiled statistics
            big_little = auto_bl if big_little == "auto" else big_little
            fallback = auto_fb if fallback == "auto" else fallback
            sparse_keep = auto_keep if sparse_keep == "auto" else sparse_keep
        dev = pick_device(config.device)
        dtype = parse_dtype(config.dtype, dev)
        kernel = Backend.parse(config.backend)
        context = config.context_for(spec.max_position_embeddings)
        check_context(spec, context)
        needs = MemoryNeeds.of(pack, device=dev, dtype=dtype, backend=kernel,
                               streams_misses=config.streams_misses)
        budget = None
        if config.vram is not None or dev.type == "cuda":
            budget = plan_budget(config.vram, needs, context=context, sequences=config.sequences)
        if config.vram is None:
            check_memory(needs, dev, context=context, sequences=config.sequences)
        dense = {t.name: pack.tensor(t.name, verify=config.verify) for t in pack.manifest.tensors}
        cache = streamer = None
        if budget is not None:
            cache = expert_cache(pack, budget.slots, dev, config.cache_policy, cache_prior=config.cache_prior)
            streamer = Streamer(pack, dev, needs.slot_bytes, verify=config.verify)
        executor = StreamingExecutor(pack, cache, streamer, backend=kernel, big_little=big_little, fallback=fallback,
                                     sparse_keep=sparse_keep, partial_loads=config.partial_loads,
                                     bypass=config.bypass, device=dev, prefetch_min_prob=config.min_prob)
        model = MoeModel(spec, dense, executor, dtype=dtype, device=dev, backend=kernel)
        executor.terms = ExpertTerms.of(spec, model.w)  # expert biases: views of the model's resident tensors
        prefetcher = (FatePrefetcher(model, executor, width=config.prefetch_width)
                      if config.prefetch == "fate" else None)
        pm = cls(pack, model, executor, budget, tokenizer, context, prefetcher)
        pm.config = config
        recipes = {p.recipe for e in pack.manifest.experts for p in e.projections.values()}
        # what the experts' products run on (cpp-avx512-vnni, torch, ...), resolved once for --stats
        pm.kernels = "+".join(sorted({kernel_name(kernel, r, dev) for r in recipes}))
        return pm

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

    def engine(self, *, max_in_flight: int = 1, prefill_per_step: int | None = None) -> Engine:
        """A runtime engine over this model (runtime/engine.py): `max_in_flight` sequences advance together."""
        return Engine(self.model, max_in_flight=max_in_flight, prefill_per_step=prefill_per_step)

    def prompt_ids(self, prompt: str | list[int], max_new_tokens: int, what: str = "prompt") -> list[int]:
        """Token ids of a prompt, checked against the context the budget was planned for."""
        ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise MoepackError(f"the {what} is empty")
        if len(ids) + max_new_tokens > self.context:
            raise MoepackError(f"{what} ({len(ids)} tokens) + max_new_tokens ({max_new_tokens}) exceed the context "
                               f"of {self.context} tokens the budget was planned for; raise --context")
        return ids

    @torch.inference_mode()
    def generate(self, prompt: str | list[int], *, max_new_tokens: int = 64, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int | None = None, on_text: Callable[[str], None] | None = None,
                 stop_at_eos: bool = True, forced: list[int] | None = None) -> Generation:
        """Sample up to `max_new_tokens` tokens after `prompt` (the engine with one sequence). `forced`: decode
        these tokens instead of sampled ones (teacher forcing through the decode path, with the same
        statistics), so that configurations whose approximations would change the text are measured on one
        workload."""
        if forced is not None:
            max_new_tokens = len(forced)
        ids = self.prompt_ids(prompt, max_new_tokens)
        stream = TextStream(self.tokenizer, ids) if self.tokenizer is not None and on_text is not None else None
        engine = self.engine()
        self._start_run()
        seq = engine.add(ids, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                         stop_at_eos=stop_at_eos, forced=forced,
                         on_token=(lambda t: on_text(stream.push(t))) if stream is not None else None)
        interrupted = False
        try:
            engine.run()
        except KeyboardInterrupt:
            interrupted = True
            engine.cancel(seq)
        engine.close()
        stats = self.run_stats(engine.stats, prompt_tokens=len(ids), tokens=len(seq.tokens))
        if seq.t_first is not None:
            stats.ttft_s = seq.t_first - seq.t_added
            stats.decode_s = seq.t_done - seq.t_first
        return Generation(self.decode(seq.tokens), seq.tokens, stats, interrupted)

    # -- stats ---------------------------------------------------------------------------------------------
    def _start_run(self) -> None:
        if self.prefetcher is not None:
            self.prefetcher.reset_counters()
        if self.model.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.model.device)

    def run_stats(self, es: EngineStats, *, prompt_tokens: int, tokens: int) -> RunStats:
        """What `run --stats` / `--json` show, rendered from the engine's accumulator."""
        ex, cache = self.executor, self.executor.cache
        stats = RunStats(prompt_tokens=prompt_tokens, tokens=tokens, total_experts=len(self.pack.manifest.experts),
                         expert_slots=cache.slots if cache is not None else None, device=str(self.model.device),
                         backend=self.kernels, prefetch="fate" if self.prefetcher is not None else "none",
                         stall_s=es.stall_s, expert_calls=es.expert_calls,
                         host_overhead_s_per_layer=es.host_overhead_s_per_layer(self.spec.num_layers))
        stats.extra["decode_path"] = self.model.decode_path  # runtime/fused_decode.py
        cs, counts = es.cache, es.counts
        if cache is not None:
            stats.cache_hits, stats.cache_misses = cs.hits, cs.misses
            stats.bytes_moved = cs.bytes_loaded
            stats.bytes_moved_decode = cs.bytes_loaded_decode if tokens else 0
            stats.prefetch_bytes = cs.prefetch_bytes
            if self.prefetcher is not None or ex.big_little is not None:
                stats.extra["prefetch_used"] = cs.prefetch_used
                stats.extra["prefetch_wasted"] = cs.prefetch_wasted
            nbytes = lambda key: ex.records[key].nbytes  # noqa: E731
            stats.belady_hit_rate = belady(es.trace, cache.slots).hit_rate
            mark = es.decode_mark if es.decode_mark is not None else len(es.trace)
            stats.belady_bytes_decode = belady(es.trace, cache.slots, nbytes=nbytes, start=mark).bytes
            stats.static_bytes_decode = static_best(es.trace, cache.slots, nbytes=nbytes, start=mark).bytes
        if self.prefetcher is not None:
            stats.prefetch_precision = self.prefetcher.score.precision
            stats.prefetch_recall = self.prefetcher.score.recall
        routed = max(counts["tokens"], 1)
        if ex.big_little is not None:
            stats.extra["little_token_share"] = counts["little_tokens"] / routed
            stats.extra["fallback_token_share"] = counts["fallback_tokens"] / routed
        if ex.sparse_keep is not None and counts["rows_total"]:
            stats.extra["channels_computed"] = counts["rows_kept"] / counts["rows_total"]
        if ex.bypass:
            stats.extra["streamed"] = counts["streamed"]
        if ex.partial_loads:
            stats.extra["partial_loads"] = counts["partial_loads"]
            stats.extra["partial_bytes_saved"] = counts["partial_bytes_saved"]
            if counts["partial_loads"]:
                stats.extra["partial_runs_per_load"] = counts["partial_runs"] / counts["partial_loads"]
        stats.peak_rss_bytes = peak_rss_bytes()
        stats.peak_device_bytes = peak_device_bytes(self.model.device)
        return stats
