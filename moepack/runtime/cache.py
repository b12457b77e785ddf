"""Expert cache: a fixed number of equal slots in ONE device buffer, so a load is one copy into a slot
and the cache can never grow past its budget. Which expert to evict is a pluggable policy."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

Key = tuple[int, int]  # (layer, expert)


class Policy:
    """Eviction policy. `victim` picks among unpinned resident keys; `incoming` is the key that needs the slot.
    `touch` is a demand use; `refresh` marks a resident key as wanted soon (a prefetch prediction) without
    counting as a use."""

    name = "base"

    def touch(self, key: Key) -> None: ...
    def refresh(self, key: Key) -> None: ...
    def insert(self, key: Key, low: bool = False) -> None: ...
    def remove(self, key: Key) -> None: ...
    def victim(self, candidates: list[Key], incoming: Key | None = None) -> Key:
        raise NotImplementedError


class LRU(Policy):
    name = "lru"

    def __init__(self) -> None:
        self.order: OrderedDict[Key, None] = OrderedDict()

    def touch(self, key: Key) -> None:
        self.order.move_to_end(key)

    refresh = touch

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
    """Least frequently used, counting every use since start (ties: least recently used)."""

    name = "lfu"

    def __init__(self) -> None:
        self.count: dict[Key, int] = {}
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


POLICIES = {"lru": LRU, "lfu": LFU, "fate": FateQuota}


def make_policy(name: str, *, slots: int | None = None, layers: list[int] | None = None) -> Policy:
    """A policy by name; `fate` needs the slot count and the sparse layers for its default quotas."""
    from moepack.errors import MoepackError

    if name not in POLICIES:
        raise MoepackError(f"unknown cache policy {name!r}; choose one of {', '.join(POLICIES)}")
    if name == "fate":
        if slots is None or not layers:
            raise MoepackError("the fate cache policy needs the slot count and the model's layers")
        return FateQuota(shallow_quotas(slots, layers))
    return POLICIES[name]()


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    bytes_loaded: int = 0  # every byte copied into a slot (demand and prefetch) or streamed as partial rows
    prefetch_loads: int = 0
    prefetch_bytes: int = 0
    prefetch_used: int = 0  # prefetched experts hit before their eviction
    prefetch_wasted: int = 0  # prefetched experts evicted unused

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


class ExpertCache:
    def __init__(self, slots: int, slot_bytes: int, device: torch.device, policy: Policy | str = "lru",
                 pin_memory: bool = False, layers: list[int] | None = None):
        if slots < 1:
            raise ValueError("an expert cache needs at least one slot")
        self.slots, self.slot_bytes, self.device = slots, slot_bytes, torch.device(device)
        self.buffer = torch.empty((slots, slot_bytes), dtype=torch.uint8, device=self.device, pin_memory=pin_memory)
        self.policy = make_policy(policy, slots=slots, layers=layers) if isinstance(policy, str) else policy
        self.where: dict[Key, int] = {}  # resident key -> slot
        self.free = list(range(slots - 1, -1, -1))
        self.pinned: set[Key] = set()  # in use by the layer being computed: not evictable
        self.prefetched: set[Key] = set()  # loaded ahead of use and not used yet
        self.stats = CacheStats()

    def __contains__(self, key: Key) -> bool:
        return key in self.where

    def __len__(self) -> int:
        return len(self.where)

    def lookup(self, key: Key) -> torch.Tensor | None:
        """The slot of a resident expert (a hit), or None (a miss). Counts either way."""
        slot = self.where.get(key)
        if slot is None:
            self.stats.misses += 1
            return None
        self.stats.hits += 1
        if key in self.prefetched:
            self.prefetched.discard(key)
            self.stats.prefetch_used += 1
        self.policy.touch(key)
        return self.buffer[slot]

    def allocate(self, key: Key, nbytes: int, *, prefetch: bool = False) -> torch.Tensor:
        """A slot for `key` (evicting if needed); the caller fills it. Returns the slot's first `nbytes`.
        `prefetch`: loaded ahead of a predicted use (counted apart; a later hit counts it as used)."""
        if nbytes > self.slot_bytes:
            raise ValueError(f"expert {key} has {nbytes} bytes, more than a slot ({self.slot_bytes})")
        if key in self.where:
            return self.buffer[self.where[key], :nbytes]
        if not self.free:
            candidates = [k for k in self.where if k not in self.pinned]
            if not candidates:
                raise RuntimeError("every cache slot is pinned; the budget planner allowed too few slots")
            self.evict(self.policy.victim(candidates, key))
        slot = self.free.pop()
        self.where[key] = slot
        self.policy.insert(key, low=prefetch)
        self.stats.bytes_loaded += nbytes
        if prefetch:
            self.prefetched.add(key)
            self.stats.prefetch_loads += 1
            self.stats.prefetch_bytes += nbytes
        return self.buffer[slot, :nbytes]

    def refresh(self, key: Key) -> bool:
        """Mark a resident key as wanted soon (no hit counted). False if it is not resident."""
        if key not in self.where:
            return False
        self.policy.refresh(key)
        return True

    def evict(self, key: Key) -> None:
        slot = self.where.pop(key)
        self.policy.remove(key)
        if key in self.prefetched:
            self.prefetched.discard(key)
            self.stats.prefetch_wasted += 1
        self.free.append(slot)
        self.stats.evictions += 1

    def resident(self) -> list[Key]:
        return list(self.where)
