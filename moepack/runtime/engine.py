"""The runtime engine: 1..N sequences advance together, one step at a time (a single prompt is N = 1).

    engine = Engine(model, max_in_flight=8)
    seq = engine.add(prompt_ids, max_new_tokens=64)
    while not engine.idle:
        for seq, token in engine.step(): ...       # tokens emitted this step
    done = engine.collect()                      # finished (or cancelled) sequences, in finishing order

One *step* admits waiting sequences while fewer than `max_in_flight` are in flight (each gets its own KV
cache, so prompts of any length mix), then feeds every sequence in flight its next tokens: a prompt chunk of
up to `prefill_chunk` tokens while it prefills (at most `prefill_per_step` prefilling sequences per step),
else its last token. All of them go through ONE forward (`MoeModel.forward_many`) as one token stream: the
dense parts run over the stack, attention per sequence, and each sparse layer's experts run once over every
token routed to them (the union of the experts of all sequences is loaded at most once per layer step:
Klotski's multi-batch pipeline). Every run option (cache policy, bypass, prefetch, big-little, FloE, partial
loads, hot experts) is a property of the model's executor and prefetcher, so it means the same with one
sequence or many.

Statistics accumulate in `engine.stats` (a `stats.EngineStats`; `reset_stats` starts a new one). A step that
feeds only decode tokens counts as decoding: its expert bytes go to `bytes_loaded_decode` and its layer wall
and kernel times to the host-overhead figure. `cancel` drops a sequence at any time; a server with continuous
batching adds sequences between steps. One engine drives a model at a time: the executor counts into the
stats of the engine made (or reset) last."""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from moepack.errors import MoepackError
from moepack.runtime.budget import PREFILL_CHUNK
from moepack.runtime.layers import KVCache
from moepack.runtime.sampling import sample
from moepack.runtime.stats import EngineStats


@dataclass(eq=False)
class Sequence:
    """One prompt and its generation. Times are perf_counter() values; `tokens` grows as it decodes."""

    id: int
    prompt: list[int]
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    generator: torch.Generator | None = None
    stop_at_eos: bool = True
    forced: list[int] | None = None  # decode these tokens instead of sampled ones (teacher forcing)
    on_token: Callable[[int], None] | None = None
    tokens: list[int] = field(default_factory=list)
    cache: KVCache | None = None
    fed: int = 0  # prompt tokens already in the cache
    t_added: float = 0.0
    t_admitted: float | None = None
    t_first: float | None = None
    t_done: float | None = None
    cancelled: bool = False

    @property
    def prefilling(self) -> bool:
        return self.fed < len(self.prompt)

    @property
    def done(self) -> bool:
        return self.t_done is not None


class Engine:
    def __init__(self, model, *, max_in_flight: int = 1, prefill_per_step: int | None = None,
                 prefill_chunk: int = PREFILL_CHUNK):
        """`model` is a runtime.model.MoeModel (its executor runs the experts). `prefill_per_step`: at most
        this many sequences feed a prompt chunk per step (default: all in flight)."""
        if max_in_flight < 1:
            raise MoepackError(f"the engine needs at least one sequence in flight, not {max_in_flight}")
        self.model, self.spec = model, model.spec
        self.max_in_flight = max_in_flight
        self.prefill_per_step = max(1, prefill_per_step if prefill_per_step is not None else max_in_flight)
        self.prefill_chunk = prefill_chunk
        self.waiting: deque[Sequence] = deque()
        self.active: list[Sequence] = []
        self.finished: list[Sequence] = []
        self._ids = itertools.count()
        self.stats = self.reset_stats()

    def reset_stats(self) -> EngineStats:
        """Start a new accumulator (handed to the executor and its cache) and return it."""
        self.stats = EngineStats()
        use = getattr(self.model.executor, "use_stats", None)
        if use is not None:
            use(self.stats)
        return self.stats

    # -- sequences -----------------------------------------------------------------------------------------
    def add(self, prompt: list[int], *, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
            seed: int | None = None, stop_at_eos: bool = True, forced: list[int] | None = None,
            on_token: Callable[[int], None] | None = None) -> Sequence:
        """Queue a prompt (token ids); it enters the next step with a free place."""
        prompt = list(prompt)
        if not prompt:
            raise MoepackError("the prompt is empty")
        if forced is not None:
            max_new_tokens = len(forced)
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        seq = Sequence(next(self._ids), prompt, max_new_tokens, temperature, top_p, gen, stop_at_eos,
                       forced, on_token, t_added=time.perf_counter())
        if max_new_tokens <= 0:
            seq.t_done = seq.t_added
            self.finished.append(seq)
        else:
            self.waiting.append(seq)
        return seq

    def cancel(self, seq: Sequence) -> None:
        """Stop a sequence now (waiting or in flight); it is collected with the tokens it has."""
        if seq.done:
            return
        if seq in self.waiting:
            self.waiting.remove(seq)
        if seq in self.active:
            self.active.remove(seq)
        seq.cancelled = True
        self._finish(seq)

    def _finish(self, seq: Sequence) -> None:
        seq.t_done = time.perf_counter()
        seq.cache = None
        self.finished.append(seq)

    def collect(self) -> list[Sequence]:
        """Finished and cancelled sequences since the last call, in finishing order."""
        out, self.finished = self.finished, []
        return out

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.active

    # -- one step --------------------------------------------------------------------------------------------
    def _admit(self) -> None:
        while self.waiting and len(self.active) < self.max_in_flight:
            seq = self.waiting.popleft()
            seq.cache = self.model.new_cache(capacity=len(seq.prompt) + seq.max_new_tokens)
            seq.t_admitted = time.perf_counter()
            self.active.append(seq)

    def step(self) -> list[tuple[Sequence, int]]:
        """Advance every sequence in flight once; returns the (sequence, token) pairs emitted."""
        t0 = time.perf_counter()
        self._admit()
        seqs, feeds, prefills = [], [], 0
        for s in self.active:
            if s.prefilling:
                if prefills >= self.prefill_per_step:
                    continue
                prefills += 1
                feeds.append(s.prompt[s.fed: s.fed + self.prefill_chunk])
                s.fed += len(feeds[-1])
            else:
                feeds.append([s.tokens[-1]])
            seqs.append(s)
        if not seqs:
            return []
        stats = self.stats
        stats.decoding = prefills == 0
        logits = self.model.forward_many(feeds, [s.cache for s in seqs])  # [S, V]
        if stats.decoding:
            stats.decode_layer_s += self.model.layer_wall_s
            stats.decode_kernel_s += self.model.layer_kernel_s
            stats.decode_tokens += len(seqs)
        emitted = []
        eos = self.spec.eos_token_ids
        for s, row in zip(seqs, logits, strict=True):
            if s.prefilling:
                continue
            if s.forced is not None:
                token = s.forced[len(s.tokens)]
            else:
                token = sample(row, temperature=s.temperature, top_p=s.top_p, generator=s.generator)
            if s.t_first is None:
                s.t_first = time.perf_counter()
            s.tokens.append(token)
            emitted.append((s, token))
            if s.on_token is not None:
                s.on_token(token)
            if (s.stop_at_eos and token in eos) or len(s.tokens) >= s.max_new_tokens:
                self.active.remove(s)
                self._finish(s)
        stats.steps += 1
        stats.wall_s += time.perf_counter() - t0
        return emitted

    def run(self) -> list[Sequence]:
        """Step until every sequence has finished; returns them all (`collect`)."""
        while not self.idle:
            self.step()
        return self.collect()

    def close(self) -> None:
        """Cancel what is left and settle the executor (loads in flight, prefetch pins)."""
        for seq in [*self.waiting, *self.active]:
            self.cancel(seq)
        drain = getattr(self.model.executor, "drain", None)
        if drain is not None:
            drain()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
