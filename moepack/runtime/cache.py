"""Expert cache: a fixed number of equal slots in ONE device buffer, so a load is one copy into a slot
and the cache can never grow past its budget. Which expert to evict is a pluggable policy."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

Key = tuple[int, int]  # (layer, expert)


class Policy:
    """Eviction policy. `victim` picks among unpinned resident keys."""

    name = "base"

    def touch(self, key: Key) -> None: ...
    def insert(self, key: Key) -> None: ...
    def remove(self, key: Key) -> None: ...
    def victim(self, candidates: list[Key]) -> Key:
        raise NotImplementedError


class LRU(Policy):
    name = "lru"

    def __init__(self) -> None:
        self.order: OrderedDict[Key, None] = OrderedDict()

    def touch(self, key: Key) -> None:
        self.order.move_to_end(key)

    def insert(self, key: Key) -> None:
        self.order[key] = None

    def remove(self, key: Key) -> None:
        self.order.pop(key, None)

    def victim(self, candidates: list[Key]) -> Key:
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

    insert = touch

    def remove(self, key: Key) -> None:
        pass  # frequencies outlive residency

    def victim(self, candidates: list[Key]) -> Key:
        return min(candidates, key=lambda k: (self.count.get(k, 0), self.clock.get(k, 0)))


POLICIES = {"lru": LRU, "lfu": LFU}


def make_policy(name: str) -> Policy:
    from moepack.errors import MoepackError

    if name not in POLICIES:
        raise MoepackError(f"unknown cache policy {name!r}; choose one of {', '.join(POLICIES)}")
    return POLICIES[name]()


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    bytes_loaded: int = 0

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


class ExpertCache:
    def __init__(self, slots: int, slot_bytes: int, device: torch.device, policy: Policy | str = "lru",
                 pin_memory: bool = False):
        if slots < 1:
            raise ValueError("an expert cache needs at least one slot")
        self.slots, self.slot_bytes, self.device = slots, slot_bytes, torch.device(device)
        self.buffer = torch.empty((slots, slot_bytes), dtype=torch.uint8, device=self.device, pin_memory=pin_memory)
        self.policy = make_policy(policy) if isinstance(policy, str) else policy
        self.where: dict[Key, int] = {}  # resident key -> slot
        self.free = list(range(slots - 1, -1, -1))
        self.pinned: set[Key] = set()  # in use by the layer being computed: not evictable
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
        self.policy.touch(key)
        return self.buffer[slot]

    def allocate(self, key: Key, nbytes: int) -> torch.Tensor:
        """A slot for `key` (evicting if needed); the caller fills it. Returns the slot's first `nbytes`."""
        if nbytes > self.slot_bytes:
            raise ValueError(f"expert {key} has {nbytes} bytes, more than a slot ({self.slot_bytes})")
        if key in self.where:
            return self.buffer[self.where[key], :nbytes]
        if not self.free:
            candidates = [k for k in self.where if k not in self.pinned]
            if not candidates:
                raise RuntimeError("every cache slot is pinned; the budget planner allowed too few slots")
            self.evict(self.policy.victim(candidates))
        slot = self.free.pop()
        self.where[key] = slot
        self.policy.insert(key)
        self.stats.bytes_loaded += nbytes
        return self.buffer[slot, :nbytes]

    def evict(self, key: Key) -> None:
        slot = self.where.pop(key)
        self.policy.remove(key)
        self.free.append(slot)
        self.stats.evictions += 1

    def resident(self) -> list[Key]:
        return list(self.where)
