"""Expert cache: a fixed number of equal slots in ONE device buffer, so a load is one copy into a slot
and the cache can never grow past its budget. Which expert to evict is a pluggable policy
(runtime/policies.py); the counters are a `stats.CacheStats` the engine owns and may replace per run."""

from __future__ import annotations

import torch

from moepack.runtime.policies import (  # noqa: F401 - re-exported: the cache's policies
    LFU,
    LRU,
    POLICIES,
    FateQuota,
    Key,
    Policy,
    Reuse,
    make_policy,
    quotas_from_recall,
    shallow_quotas,
)
from moepack.runtime.stats import CacheStats  # noqa: F401 - re-exported


class ExpertCache:
    def __init__(self, slots: int, slot_bytes: int, device: torch.device, policy: Policy | str = "lru",
                 pin_memory: bool = False, layers: list[int] | None = None,
                 popularity: dict[Key, float] | None = None):
        if slots < 1:
            raise ValueError("an expert cache needs at least one slot")
        self.slots, self.slot_bytes, self.device = slots, slot_bytes, torch.device(device)
        self.buffer = torch.empty((slots, slot_bytes), dtype=torch.uint8, device=self.device, pin_memory=pin_memory)
        self.policy = (make_policy(policy, slots=slots, layers=layers, popularity=popularity)
                       if isinstance(policy, str) else policy)
        self.where: dict[Key, int] = {}  # resident key -> slot
        self.free = list(range(slots - 1, -1, -1))
        self.pinned: set[Key] = set()  # in use by the layer being computed: not evictable
        self.prefetched: set[Key] = set()  # loaded ahead of use and not used yet
        self.stats = CacheStats()

    def __contains__(self, key: Key) -> bool:
        return key in self.where

    def __len__(self) -> int:
        return len(self.where)

    def slot(self, key: Key) -> int | None:
        """The slot index of a resident key (no counting), or None."""
        return self.where.get(key)

    def lookup(self, key: Key) -> torch.Tensor | None:
        """The slot of a resident expert (a hit), or None (a miss). Counts either way."""
        self.policy.access(key)
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
        self.stats.moved(nbytes)
        if prefetch:
            self.prefetched.add(key)
            self.stats.prefetch_loads += 1
            self.stats.prefetch_bytes += nbytes
        return self.buffer[slot, :nbytes]

    def visit(self, layer: int, uses: dict[int, int], tokens: int) -> None:
        """Layer `layer` is about to run `tokens` tokens; `uses[e]` of them are routed to expert e."""
        self.policy.visit(layer, uses, tokens)

    def hint(self, key: Key, prob: float) -> None:
        """`key` is predicted for its layer's next visit with probability `prob` (resident or not)."""
        self.policy.hint(key, prob)

    def would_evict(self, key: Key) -> Key | None:
        """The key that loading `key` would evict now (None: a free slot, or `key` is resident)."""
        if key in self.where or self.free:
            return None
        candidates = [k for k in self.where if k not in self.pinned]
        return self.policy.victim(candidates, key) if candidates else None

    def admits(self, key: Key, prob: float | None = None, *, beyond: bool = False) -> bool:
        """Whether loading `key` now is worth what it would evict (True with a free slot; False if every slot
        is pinned). `prob`: `key` is a prediction with that probability, not a demand use; `beyond`: judge it
        by its uses after the predicted one (see Policy)."""
        if key in self.where or self.free:
            return True
        victim = self.would_evict(key)
        return victim is not None and self.policy.admit(key, victim, prob, beyond)

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
