"""Eviction and admission policies of the expert cache (runtime/cache.py): lru, lfu, fate, reuse."""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Callable

Key = tuple[int, int]  # (layer, expert)
PRIOR_TOKENS = 32.0  # weight of the profiled routing frequencies, in tokens (about the reuse policy's memory)
REUSE_HALF_LIVES = (8.0, 16.0, 32.0, 64.0)  # the reuse policy's memories, in tokens; it follows the best (see Reuse)
SCORE_HALF_LIFE = 32.0  # tokens: how long a ghost cache's misses count towards choosing among them


class Policy:
    """Eviction policy. `victim` picks among unpinned resident keys; `incoming` is the key that needs the slot.
    `touch` is a demand use; `refresh` marks a resident key as wanted soon (a prefetch prediction) without
    counting as a use. `visit` tells it a layer is about to run (with each routed expert's token count), `hint`
    that a key will be used at its layer's next visit with probability `prob` (a next-layer prediction).

    `admit(incoming, victim, prob, beyond)`: is `incoming` worth more in the cache than `victim`, the key it
    would evict? It decides whether a prediction is prefetched and whether a miss under partial loads is cached
    (otherwise it streams only the rows it needs). `beyond`: judge a prediction by its uses after the predicted
    one, as its demand miss would be judged (under partial loads that use is served either way, by a cheaper
    partial read). The default compares decayed use counts (TinyLFU-style admission), for a prediction its
    count scaled up by `prob`; policies that estimate reuse override it. `bypass` (set by the executor):
    misses may skip the cache when not admitted, so a policy that simulates the cache replays them that way."""

    name = "base"

    def __init__(self) -> None:
        self.uses: dict[Key, float] = {}  # decayed demand uses, for admission
        self.uses_t = 0
        self.bypass = False  # set by the executor: a miss the policy does not admit may skip the cache

    def touch(self, key: Key) -> None: ...
    def refresh(self, key: Key) -> None: ...
    def insert(self, key: Key, low: bool = False) -> None: ...
    def remove(self, key: Key) -> None: ...
    def visit(self, layer: int, uses: dict[int, int], tokens: int) -> None: ...
    def hint(self, key: Key, prob: float) -> None: ...

    def victim(self, candidates: list[Key], incoming: Key | None = None) -> Key:
        raise NotImplementedError

    def access(self, key: Key) -> None:
        """Every demand access, hit or miss (the cache calls it from `lookup`)."""
        self.uses_t += 1
        if self.uses_t % 4096 == 0:  # halve every count now and then: old popularity fades
            self.uses = {k: v / 2 for k, v in self.uses.items() if v >= 0.25}
        self.uses[key] = self.uses.get(key, 0.0) + 1.0

    def admit(self, incoming: Key, victim: Key, prob: float | None = None, beyond: bool = False) -> bool:
        mine = self.uses.get(incoming, 0.0) + (1.0 if prob is None or beyond else prob)  # this use (or predicted)
        return mine > self.uses.get(victim, 0.0)


class LRU(Policy):
    name = "lru"

    def __init__(self) -> None:
        super().__init__()
        self.order: OrderedDict[Key, None] = OrderedDict()

    def touch(self, key: Key) -> None:
        self.order.move_to_end(key)

    refresh = touch  # a predicted use keeps a key as fresh as a real one

    def insert(self, key: Key, low: bool = False) -> None:
        """`low`: a prefetched key enters as the next victim, so a wrong prediction displaces only another."""
        self.order[key] = None
        if low:
            self.order.move_to_end(key, last=False)

    def remove(self, key: Key) -> None:
        self.order.pop(key, None)

    def victim(self, candidates: list[Key], incoming: Key | None = None) -> Key:
        allowed = set(candidates)
        return next(k for k in self.order if k in allowed)


class LFU(Policy):
    """Least frequently used, counting every use since start (ties: least recently used). `popularity`: the
    profiled probability that a token routes to each expert, counted as `prior_tokens` tokens of uses."""

    name = "lfu"

    def __init__(self, popularity: dict[Key, float] | None = None, prior_tokens: float = PRIOR_TOKENS) -> None:
        super().__init__()
        self.count: dict[Key, float] = {k: prior_tokens * p for k, p in (popularity or {}).items()}
        self.clock: dict[Key, int] = {}
        self.t = 0

    def touch(self, key: Key) -> None:
        self.t += 1
        self.count[key] = self.count.get(key, 0) + 1
        self.clock[key] = self.t

    def insert(self, key: Key, low: bool = False) -> None:
        if low:  # a prediction is not a use: keep the count, lowest recency
            self.clock.setdefault(key, 0)
        else:
            self.touch(key)

    def refresh(self, key: Key) -> None:
        self.t += 1
        self.clock[key] = self.t

    def remove(self, key: Key) -> None:
        pass  # frequencies outlive residency

    def victim(self, candidates: list[Key], incoming: Key | None = None) -> Key:
        return min(candidates, key=lambda k: (self.count.get(k, 0), self.clock.get(k, 0)))


class FateQuota(LRU):
    """Fate's shallow-favouring allocation: every layer has a (soft, fractional) slot quota, larger for shallow
    layers, whose experts next-layer prediction covers worst (layer 0 is never predicted at all).
    A layer at or over its quota replaces its own least recently used expert; a layer under quota takes the
    slot of the least recently used expert of a layer over its quota; otherwise plain LRU."""

    name = "fate"

    def __init__(self, quotas: dict[int, float]):
        super().__init__()
        self.quotas = dict(quotas)
        self.count: dict[int, int] = {}

    def insert(self, key: Key, low: bool = False) -> None:
        super().insert(key, low)
        self.count[key[0]] = self.count.get(key[0], 0) + 1

    def remove(self, key: Key) -> None:
        if key in self.order:
            self.count[key[0]] -= 1
        super().remove(key)

    def victim(self, candidates: list[Key], incoming: Key | None = None) -> Key:
        allowed = set(candidates)
        if incoming is not None:
            layer = incoming[0]
            if self.count.get(layer, 0) >= self.quotas.get(layer, 0.0):
                own = next((k for k in self.order if k in allowed and k[0] == layer), None)
                if own is not None:
                    return own
        over = {layer for layer, n in self.count.items() if n > self.quotas.get(layer, 0.0)}
        pick = next((k for k in self.order if k in allowed and k[0] in over), None)
        return pick if pick is not None else next(k for k in self.order if k in allowed)


class ReuseEstimate:
    """The reuse policy's model of when each expert is next used, at one memory length (`half_life`, tokens).

    Layers run in a fixed cycle, one visit per token. Standing at layer `cur`, an expert of layer l is next
    wanted at its layer's next visit, d = (pos(l) - pos(cur)) mod n layers ahead (n for `cur` itself: this
    token's experts are pinned), and each visit routes a token to it with probability p (its decayed share of
    the layer's tokens). The expected distance to its next use is then

        d + (1 - p1) * n / p        (p1 = p, or the predicted probability when a next-layer prediction hinted it)

    Counted in visits from the start (`when`), that expected time changes only when the expert's own layer is
    visited (p changes) or it is hinted, so it is cached per expert until then, and an index of the residents
    ordered by it (`Farthest`) needs renewing only for those. `popularity` (profiled routing probabilities) is
    a prior worth `prior_tokens` tokens that never decays."""

    def __init__(self, layers: list[int], half_life: float, *, prior: float = 0.25,
                 popularity: dict[Key, float] | None = None, prior_tokens: float = PRIOR_TOKENS):
        self.pos = {layer: i for i, layer in enumerate(layers)}
        self.n = len(layers)
        self.half_life, self.prior = half_life, prior
        self.popularity = dict(popularity or {})
        self.prior_tokens = prior_tokens if popularity else 0.0
        self.freq: dict[int, dict[int, float]] = {layer: {} for layer in layers}  # decayed token counts
        self.tokens: dict[int, float] = dict.fromkeys(layers, 0.0)
        self.hints: dict[Key, float] = {}
        self.cur: int | None = None
        self.step = 0  # visits so far
        self.cached: dict[int, dict[int, float]] = {layer: {} for layer in layers}  # layer -> expert -> when

    def visit(self, layer: int, uses: dict[int, int], tokens: int) -> None:
        decay = 0.5 ** (tokens / self.half_life)
        f = self.freq.setdefault(layer, {})
        for e in list(f):
            f[e] *= decay
        for e, c in uses.items():
            f[e] = f.get(e, 0.0) + c
        self.tokens[layer] = self.tokens.get(layer, 0.0) * decay + tokens
        self.hints = {k: v for k, v in self.hints.items() if k[0] != layer}  # they were about this visit
        self.cached[layer] = {}
        self.cur = layer
        self.step += 1

    def hint(self, key: Key, prob: float) -> None:
        self.hints[key] = prob
        self.cached.get(key[0], {}).pop(key[1], None)

    def prob(self, key: Key) -> float:
        """Share of this layer's tokens routed to the expert (decayed), with the profiled prior (or a weak one)."""
        f = self.freq.get(key[0], {}).get(key[1], 0.0) + self.prior_tokens * self.popularity.get(key, 0.0)
        return (f + self.prior) / (self.tokens.get(key[0], 0.0) + self.prior_tokens + 1.0)

    def distance(self, key: Key, first: float | None = None, beyond: bool = False) -> float | None:
        """Expected layer steps until the key's next use (`first`: its probability at the next visit;
        `beyond`: its first use after the next visit, d + n / p). None before any visit or for a layer
        outside the cycle."""
        if self.cur is None or key[0] not in self.pos:
            return None
        d, wait = self._parts(key, first, beyond)
        return d + wait

    def _parts(self, key: Key, first: float | None = None, beyond: bool = False) -> tuple[int, float]:
        """(layer steps to the key's layer, expected further steps until a token uses it)."""
        d = (self.pos[key[0]] - self.pos[self.cur]) % self.n or self.n
        p = min(self.prob(key), 1.0)
        if beyond:
            return d, self.n / p
        p1 = self.hints.get(key, p) if first is None else first
        return d, (1.0 - p1) * self.n / p

    def when(self, key: Key) -> float:
        """The visit at which the key's next use is expected (`step` + distance; cached until its layer is visited
        or it is hinted). 0 before any visit or for a layer outside the cycle."""
        layer = self.cached.get(key[0])
        if layer is None or self.cur is None:
            return 0.0
        t = layer.get(key[1])
        if t is None:  # step + d is the same integer from any visit until the key's layer comes round
            d, wait = self._parts(key)
            t = layer[key[1]] = (self.step + d) + wait
        return t


class Farthest:
    """Resident keys in eviction order under one estimate: the expected next use farthest away first, then the
    least recently used. A lazy heap: when a key's expected next use or recency changes it gets a new entry and
    the old one is skipped when met, so the victim among many residents costs O(log n), not a scan. The owner
    tells it each visit after the estimate (`visited`) and renews a key after a hint (`renew`). A visited
    layer's keys are renewed when a victim is next asked for, not at every visit: a key's expected next use
    does not change until its layer comes round again (`ReuseEstimate.when`), so the order is the same, and
    a cache that rarely evicts does no per-visit work."""

    def __init__(self, estimate: ReuseEstimate):
        self.estimate = estimate
        self.heap: list[tuple[float, int, Key]] = []  # (-when, last use, key)
        self.entry: dict[Key, tuple[float, int, Key]] = {}  # each resident key's current entry
        self.layers: dict[int, set[int]] = {}  # layer -> its resident experts
        self.dirty: set[int] = set()  # layers visited since the last renewal
        self.all_dirty = False

    def put(self, key: Key, last: int) -> None:
        """Insert `key`, or renew it with its recency `last`."""
        if key not in self.entry:
            self.layers.setdefault(key[0], set()).add(key[1])
        entry = (-self.estimate.when(key), last, key)
        self.entry[key] = entry
        heapq.heappush(self.heap, entry)
        if len(self.heap) > 4 * len(self.entry) + 64:  # mostly stale: rebuild
            self.heap = list(self.entry.values())
            heapq.heapify(self.heap)

    def drop(self, key: Key) -> None:
        if self.entry.pop(key, None) is not None:
            self.layers[key[0]].discard(key[1])

    def renew(self, key: Key) -> None:
        entry = self.entry.get(key)
        if entry is not None:
            self.put(key, entry[1])

    def visited(self, layer: int) -> None:
        """The estimate was told a visit of `layer`: its keys' expected next uses moved (at the first visit,
        every key's: before it they were all 0)."""
        if self.estimate.step == 1:
            self.all_dirty = True
        else:
            self.dirty.add(layer)

    def _renew_visited(self) -> None:
        if self.all_dirty:
            keys = list(self.entry)
        else:
            keys = [(layer, e) for layer in self.dirty for e in self.layers.get(layer, ())]
        self.dirty, self.all_dirty = set(), False
        for key in keys:
            self.renew(key)

    def victim(self, allowed: Callable[[Key], bool]) -> Key | None:
        """The first key in eviction order that `allowed` accepts (None: none does)."""
        if self.dirty or self.all_dirty:
            self._renew_visited()
        heap, entry, aside, found = self.heap, self.entry, [], None
        while heap:
            top = heap[0]
            if entry.get(top[2]) is not top:  # stale
                heapq.heappop(heap)
            elif not allowed(top[2]):
                aside.append(heapq.heappop(heap))
            else:
                found = top[2]
                break
        for top in aside:
            heapq.heappush(heap, top)
        return found


class Ghost:
    """A replay of the cache with keys only (nothing moves) under one estimate's choices: its misses, decayed
    with a half-life of SCORE_HALF_LIFE tokens, score that estimate."""

    def __init__(self, estimate: ReuseEstimate, slots: int):
        self.estimate, self.slots = estimate, slots
        self.order = Farthest(estimate)
        self.misses = 0.0
        self.t = 0

    def access(self, key: Key, busy: set[Key], bypass: bool) -> None:
        self.t += 1
        if key in self.order.entry:
            self.order.put(key, self.t)
            return
        self.misses += 1.0
        if len(self.order.entry) < self.slots:
            self.order.put(key, self.t)
            return
        victim = self.order.victim(lambda k: k not in busy)
        if victim is None or (bypass and not self.estimate.when(key) < self.estimate.when(victim)):
            return
        self.order.drop(victim)
        self.order.put(key, self.t)


class Reuse(Policy):
    """Evict the expert whose next use is expected farthest away: an online estimate of Belady's choice
    (see ReuseEstimate). LRU evicts the layer just used last, which in a cycle is the one needed soonest, and
    thrashes once the cycle outgrows the slots; this keeps both the near layers and the popular experts.
    Ties: least recently used. Admission (prefetch, bypass, partial loads) admits a key whose expected
    distance is shorter than the victim's.

    How fast routing frequencies should be forgotten depends on the model: the trained toy model's popular
    experts stay popular (a memory of 32-64 tokens moved the fewest bytes), a random-weight model's drift
    within a few tokens (8). With several `half_life`s (and the slot count) the policy keeps one estimate per
    half-life and a ghost cache for each, a replay of the cache under that estimate's choices with keys only,
    and follows the estimate whose ghost has missed least lately (adaptive caching by following the best of
    several experts, as in ACME). `bypass` (set by the executor): the ghosts replay misses that need not be
    cached.

    `popularity` (the profiled probability that a token routes to each expert, from the pack's calibration
    run) is a prior worth `prior_tokens` tokens that never decays, so a cold cache ranks experts before it has
    seen any routing. Measured, it moved more bytes on both benchmark models (docs/benchmarks.md, prefetch):
    which experts the next tokens use follows the recent tokens more than calibration-wide popularity."""

    name = "reuse"

    def __init__(self, layers: list[int], *, half_life: float | tuple[float, ...] = 32.0, slots: int | None = None,
                 prior: float = 0.25, popularity: dict[Key, float] | None = None,
                 prior_tokens: float = PRIOR_TOKENS):
        super().__init__()
        half_lives = (half_life,) if isinstance(half_life, (int, float)) else tuple(half_life)
        if len(half_lives) > 1 and slots is None:
            raise ValueError("a reuse policy with several half-lives needs the slot count for its ghost caches")
        self.layers = list(layers)
        self.estimates = [ReuseEstimate(self.layers, h, prior=prior, popularity=popularity, prior_tokens=prior_tokens)
                          for h in half_lives]
        self.ghosts = [Ghost(e, slots) for e in self.estimates] if len(half_lives) > 1 else []
        self.lead = 0  # the estimate followed
        self.order = Farthest(self.estimate)  # the resident keys in its eviction order
        self.busy: set[Key] = set()  # the experts of the visit under way (pinned)
        self.last: dict[Key, int] = {}
        self.t = 0

    @property
    def estimate(self) -> ReuseEstimate:
        return self.estimates[self.lead]

    def _all_orders(self) -> list[Farthest]:
        return [self.order] + [g.order for g in self.ghosts]

    def visit(self, layer: int, uses: dict[int, int], tokens: int) -> None:
        for e in self.estimates:
            e.visit(layer, uses, tokens)
        for order in self._all_orders():
            order.visited(layer)
        self.busy = {(layer, e) for e in uses}
        forget = 0.5 ** (tokens / (SCORE_HALF_LIFE * len(self.layers)))
        for g in self.ghosts:
            g.misses *= forget

    def access(self, key: Key) -> None:
        super().access(key)
        if self.ghosts:
            for g in self.ghosts:
                g.access(key, self.busy, self.bypass)
            lead = min(range(len(self.ghosts)), key=lambda i: self.ghosts[i].misses)
            if lead != self.lead:  # follow the other estimate: the residents in its order
                self.lead, old = lead, self.order
                self.order = Farthest(self.estimate)
                for k, entry in old.entry.items():
                    self.order.put(k, entry[1])

    def hint(self, key: Key, prob: float) -> None:
        for e in self.estimates:
            e.hint(key, prob)
        for order in self._all_orders():
            order.renew(key)

    def prob(self, key: Key) -> float:
        return self.estimate.prob(key)

    def distance(self, key: Key, first: float | None = None, beyond: bool = False) -> float:
        """Expected layer steps until the key's next use under the followed estimate (before any visit:
        recency, as LRU)."""
        d = self.estimate.distance(key, first, beyond)
        return float(-self.last.get(key, 0)) if d is None else d

    def touch(self, key: Key) -> None:
        self.t += 1
        self.last[key] = self.t
        self.order.put(key, self.t)

    refresh = touch

    def insert(self, key: Key, low: bool = False) -> None:
        self.last[key] = self.t + 1 if not low else 0
        self.t += 1
        self.order.put(key, self.last[key])

    def remove(self, key: Key) -> None:
        self.last.pop(key, None)
        self.order.drop(key)

    def victim(self, candidates: list[Key], incoming: Key | None = None) -> Key:
        allowed = set(candidates)
        found = self.order.victim(allowed.__contains__)
        if found is None:  # keys it was never told were inserted: scan them
            when = self.estimate.when
            found = max(candidates, key=lambda k: (when(k), -self.last.get(k, 0)))
        return found

    def admit(self, incoming: Key, victim: Key, prob: float | None = None, beyond: bool = False) -> bool:
        return self.distance(incoming, prob, beyond) < self.distance(victim)


def shallow_quotas(slots: int, layers: list[int], strength: float = 1.0) -> dict[int, float]:
    """Quotas summing to `slots`, falling linearly with depth: the shallowest layer gets (1 + strength) times
    the weight of the deepest."""
    n = len(layers)
    w = [1.0 + strength * (1.0 - i / max(n - 1, 1)) for i in range(n)]
    return {layer: slots * wi / sum(w) for layer, wi in zip(layers, w, strict=True)}


def quotas_from_recall(slots: int, recall: dict[int, float], floor: float = 0.1) -> dict[int, float]:
    """Quotas from a profiled run: proportional to what prefetch misses in each layer (1 - recall), with a
    floor so every layer keeps some slots. Layers never predicted (recall 0) get the most."""
    w = {layer: max(1.0 - r, floor) for layer, r in recall.items()}
    total = sum(w.values())
    return {layer: slots * v / total for layer, v in w.items()}


POLICIES = {"lru": LRU, "lfu": LFU, "fate": FateQuota, "reuse": Reuse}


def make_policy(name: str, *, slots: int | None = None, layers: list[int] | None = None,
                popularity: dict[Key, float] | None = None) -> Policy:
    """A policy by name; `fate` needs the slot count and the sparse layers for its default quotas, `reuse`
    the sparse layers (their order). `popularity` (profiled routing probabilities) seeds lfu and reuse."""
    from moepack.errors import MoepackError

    if name not in POLICIES:
        raise MoepackError(f"unknown cache policy {name!r}; choose one of {', '.join(POLICIES)}")
    if name == "fate":
        if slots is None or not layers:
            raise MoepackError("the fate cache policy needs the slot count and the model's layers")
        return FateQuota(shallow_quotas(slots, layers))
    if name == "reuse":
        if not layers:
            raise MoepackError("the reuse cache policy needs the model's layers")
        return Reuse(layers, half_life=REUSE_HALF_LIVES if slots is not None else 32.0, slots=slots,
                     popularity=popularity)
    if name == "lfu":
        return LFU(popularity)
    return POLICIES[name]()
