"""The one place a memory budget (--vram) becomes resident dense weights, KV caches, workspace, a transit
buffer and expert slots. `run`, `plan`, `serve`, the benchmarks and the tests all call `plan_budget` (or
`slots_left`) with the pack's `MemoryNeeds`, so they cannot disagree about how many experts fit."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from moepack.errors import BudgetError
from moepack.units import format_size

PREFILL_CHUNK = 256  # prompt tokens per forward during prefill (bounds activation memory)


def workspace_bytes(spec, dtype: torch.dtype) -> int:
    """Activations of one prefill chunk: hidden states, attention scores, expert intermediates, logits."""
    per_token = (4 * spec.hidden_size + 3 * spec.moe_intermediate_size + spec.vocab_size
                 + 2 * spec.num_heads * PREFILL_CHUNK)
    return 2 * PREFILL_CHUNK * per_token * max(dtype.itemsize, 4)


@dataclass(frozen=True)
class MemoryNeeds:
    """What a pack needs on the device, part by part, for one device and compute dtype."""

    dense_bytes: int  # resident dense weights, as the model holds them
    kv_bytes_per_token: int  # one sequence's KV cache per token (under MLA: the latent and the rotary key)
    workspace_bytes: int  # one prefill chunk's activations
    transit_bytes: int  # CUDA: the one slot that misses skipping the cache stream through
    slot_bytes: int  # one expert slot (the largest expert)
    total_experts: int
    min_slots: int  # a layer's top-k must fit at once

    @classmethod
    def of(cls, pack, *, device: torch.device, dtype: torch.dtype, backend="auto",
           streams_misses: bool = False) -> MemoryNeeds:
        """From the manifest alone (no tensor is read)."""
        from moepack.arch import adapter_for
        from moepack.format.constants import DTYPES
        from moepack.runtime.mla import cache_class
        from moepack.runtime.model import storage_dtype, widens_on

        spec, device = pack.spec, torch.device(device)
        widen = widens_on(device, dtype, backend)
        # MLA holds kv_b_proj in the compute dtype (its per-head absorbed products): counted as a vector would be
        wide = {n["kv_b"] for n in map(adapter_for(spec).layer_tensor_names, range(spec.num_layers)) if "kv_b" in n}
        dense = sum(math.prod(t.shape) * storage_dtype(DTYPES[t.dtype], 1 if t.name in wide else len(t.shape),
                                                       dtype, widen).itemsize
                    for t in pack.manifest.tensors)  # as MoeModel holds them
        slot = max(e.nbytes for e in pack.manifest.experts)
        return cls(dense_bytes=dense, kv_bytes_per_token=cache_class(spec).bytes_per_token(spec, dtype),
                   workspace_bytes=workspace_bytes(spec, dtype),
                   transit_bytes=slot if streams_misses and device.type == "cuda" else 0,
                   slot_bytes=slot, total_experts=len(pack.manifest.experts), min_slots=spec.top_k)

    def fixed_bytes(self, context: int, sequences: int = 1) -> int:
        """Everything but the expert slots, for `sequences` KV caches of `context` tokens."""
        return (self.dense_bytes + sequences * context * self.kv_bytes_per_token + self.workspace_bytes
                + self.transit_bytes)


@dataclass(frozen=True)
class BudgetPlan:
    budget: int | None  # None: unlimited (every expert gets a slot)
    dense_bytes: int
    kv_bytes: int
    workspace_bytes: int  # activations and the transit buffer
    slot_bytes: int
    slots: int
    total_experts: int

    @property
    def expert_bytes(self) -> int:
        return self.slots * self.slot_bytes

    @property
    def fixed_bytes(self) -> int:
        """Everything but the expert slots."""
        return self.dense_bytes + self.kv_bytes + self.workspace_bytes

    def vram_for(self, slots: int) -> int:
        """The budget that leaves exactly `slots` expert slots beside the same dense weights, KV and workspace."""
        return self.fixed_bytes + slots * self.slot_bytes

    @property
    def fraction_resident(self) -> float:
        return self.slots / self.total_experts

    def describe(self) -> str:
        return (f"dense {format_size(self.dense_bytes)} + KV {format_size(self.kv_bytes)} + workspace "
                f"{format_size(self.workspace_bytes)} + {self.slots}/{self.total_experts} expert slots x "
                f"{format_size(self.slot_bytes)} = {format_size(self.fixed_bytes + self.expert_bytes)}")


def slots_left(budget: int | None, needs: MemoryNeeds, *, context: int, sequences: int = 1) -> int:
    """Expert slots a budget leaves (every expert with no budget; possibly fewer than a layer needs)."""
    if budget is None:
        return needs.total_experts
    fixed = needs.fixed_bytes(context, sequences)
    return int(min(needs.total_experts, (budget - fixed) // needs.slot_bytes)) if budget > fixed else 0


def plan_budget(budget: int | None, needs: MemoryNeeds, *, context: int, sequences: int = 1,
                label: str = "--vram") -> BudgetPlan:
    """Split the budget. Too small: BudgetError with the minimum that works."""
    slots = slots_left(budget, needs, context=context, sequences=sequences)
    kv = sequences * context * needs.kv_bytes_per_token
    work = needs.workspace_bytes + needs.transit_bytes
    if budget is not None and slots < needs.min_slots:
        minimum = needs.fixed_bytes(context, sequences) + needs.min_slots * needs.slot_bytes
        seqs = f"{sequences} sequences' " if sequences > 1 else ""
        raise BudgetError(
            f"{label} {format_size(budget)} is too small: it needs at least {format_size(minimum)} "
            f"(dense weights {format_size(needs.dense_bytes)} + {seqs}KV cache {format_size(kv)} + workspace "
            f"{format_size(work)} + {needs.min_slots} expert slots of {format_size(needs.slot_bytes)}); "
            f"shorten the context, or compress harder")
    return BudgetPlan(budget, needs.dense_bytes, kv, work, needs.slot_bytes, slots, needs.total_experts)
