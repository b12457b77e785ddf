"""Many prompts at once: the runtime engine (runtime/engine.py) with `batches` x `batch_size` sequences in
flight, and the statistics of such a run (`moepack run --prompts`).

There is no second engine here: `generate_many` queues every prompt on one `Engine` over the model, whose
executor loads the union of the experts that the stacked tokens of a step route to once per layer step and
computes each once over all of them (Klotski's expert-aware multi-batch pipeline); every run option of the
model (cache policy, bypass, prefetch, big-little, FloE, partial loads) applies as with one prompt. Greedy
outputs are those of `MoePackModel.generate` on each prompt alone up to float rounding: only the expert
products see more tokens at once.

    results = generate_many(model, prompts, batches=8, max_new_tokens=64)
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch

from moepack.errors import MoepackError
from moepack.runtime.api import MoePackModel, expert_cache
from moepack.runtime.executor import StreamingExecutor
from moepack.runtime.prefetch import FatePrefetcher
from moepack.runtime.routing_trace import RoutingTrace
from moepack.runtime.stats import SequenceResult, ThroughputStats
from moepack.runtime.streamer import Streamer

__all__ = ["SequenceResult", "ThroughputResult", "ThroughputStats", "generate_many", "load_for_throughput"]

Key = tuple[int, int]


@dataclass
class ThroughputResult:
    results: list[SequenceResult]
    stats: ThroughputStats
    interrupted: bool = False  # Ctrl-C: the results hold the tokens generated until then


def load_for_throughput(path, *, vram: str | int | None, batches: int, batch_size: int = 1, context: int = 2048,
                        slots: int | None = None, **options) -> MoePackModel:
    """A MoePackModel whose budget holds `batches` x `batch_size` KV caches of `context` tokens (so the expert
    slots are what is left after them), or exactly `slots` expert slots when given (benchmarks)."""
    if isinstance(options.get("dtype"), torch.dtype):  # a loaded model's dtype, as RunConfig names it
        options["dtype"] = str(options["dtype"]).removeprefix("torch.")
    pm = MoePackModel.load(path, vram=vram if slots is None else None, context=context, batches=batches,
                           batch_size=batch_size, **options)
    if slots is None and pm.executor.cache is None:  # no budget: every expert gets a slot
        slots = len(pm.pack.manifest.experts)
    if slots is not None:
        pack, old = pm.pack, pm.executor
        slots = max(1, min(slots, len(pack.manifest.experts)))
        config = pm.config
        cache = expert_cache(pack, slots, pm.model.device, config.cache_policy, cache_prior=config.cache_prior)
        streamer = Streamer(pack, pm.model.device, cache.slot_bytes, verify=config.verify)
        pm.executor = StreamingExecutor(pack, cache, streamer, backend=old.backend, big_little=old.big_little,
                                        fallback=old.fallback, sparse_keep=old.sparse_keep,
                                        partial_loads=config.partial_loads, bypass=config.bypass,
                                        device=pm.model.device,
                                        prefetch_min_prob=old.prefetch_min_prob, terms=old.terms)
        pm.model.executor = pm.executor
        if pm.prefetcher is not None:
            pm.prefetcher.executor = pm.executor
    return pm


def generate_many(model: MoePackModel, prompts: list[str | list[int]], *, batches: int = 4, batch_size: int = 1,
                  max_new_tokens: int = 64, hot: Seq[Key] = (), trace: RoutingTrace | None = None,
                  prefetch: bool | None = None, prefill_per_step: int | None = None,
                  record: RoutingTrace | None = None, temperature: float = 0.0, top_p: float = 1.0,
                  seed: int | None = None, stop_at_eos: bool = True) -> ThroughputResult:
    """Generate for every prompt with `batches` batches of `batch_size` sequences in flight. `hot`: experts
    kept resident for the run; `prefetch`: next-layer prefetch (None: as the model was loaded; True adds a
    Fate prefetcher for this run where the model has none), widened by `trace`'s co-occurring experts;
    `record`: a routing trace to fill; `seed + i` seeds prompt i."""
    if batches < 1:
        raise MoepackError("--batches must be at least 1")
    if batch_size < 1:
        raise MoepackError("--batch-size must be at least 1")
    ids = [model.prompt_ids(p, max_new_tokens, what=f"prompt {i + 1}") for i, p in enumerate(prompts)]
    pf = model.prefetcher
    added = None
    if prefetch and (pf is None or trace is not None):
        added = FatePrefetcher(model.model, model.executor, trace=trace)
    if pf is not None and (prefetch is False or added is not None):
        pf.detach()
    hooks = model.model.route_hooks
    if record is not None:
        hooks.append(record.hook)
    engine = model.engine(max_in_flight=batches * batch_size,
                          prefill_per_step=prefill_per_step if prefill_per_step is not None else batch_size)
    model._start_run()
    ex, interrupted = model.executor, False
    try:
        ex.pin_hot(hot)
        seqs = [engine.add(p, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                           seed=None if seed is None else seed + i, stop_at_eos=stop_at_eos)
                for i, p in enumerate(ids)]
        try:
            engine.run()
        except KeyboardInterrupt:
            interrupted = True
    finally:
        engine.close()
        ex.unpin_hot()
        if added is not None:
            added.detach()
        if pf is not None and pf.on_route not in hooks:
            hooks.append(pf.on_route)
        if record is not None:
            hooks.remove(record.hook)
    es = engine.stats
    t0 = min(s.t_added for s in seqs)
    results = [SequenceResult(i, len(s.prompt), s.tokens, model.decode(s.tokens), s.t_done - t0,
                              (s.t_first if s.t_first is not None else s.t_done) - t0,
                              (s.t_admitted if s.t_admitted is not None else s.t_done) - t0)
               for i, s in enumerate(seqs)]
    cs = es.cache
    stats = ThroughputStats(
        prompts=len(results), batches=batches, batch_size=batch_size,
        generated_tokens=sum(len(r.tokens) for r in results), prompt_tokens=sum(r.prompt_tokens for r in results),
        wall_s=es.wall_s, steps=es.steps, layer_steps=es.layer_steps, stall_s=es.stall_s,
        load_s=ex.loader.busy_s if ex.loader is not None else 0.0, loads=es.loads, bytes_moved=cs.bytes_loaded,
        cache_hits=cs.hits, cache_misses=cs.misses, expert_calls=es.expert_calls, expert_tokens=es.expert_tokens,
        prefetch_issued=es.counts["prefetch_issued"], prefetch_used=cs.prefetch_used,
        prefetch_wasted=cs.prefetch_wasted, duplicate_loads=es.duplicate_loads,
        expert_slots=ex.cache.slots if ex.cache is not None else 0, hot_experts=len(dict.fromkeys(hot)),
        host_overhead_s_per_layer=es.host_overhead_s_per_layer(model.spec.num_layers),
        latencies_s=[r.latency_s for r in results])
    return ThroughputResult(results, stats, interrupted)
