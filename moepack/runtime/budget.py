"""Split a memory budget (--vram) into resident dense weights, KV cache, workspace and expert slots."""

from __future__ import annotations

from dataclasses import dataclass

from moepack.errors import BudgetError
from moepack.units import format_size


@dataclass(frozen=True)
class BudgetPlan:
    budget: int | None  # None: unlimited (every expert gets a slot)
    dense_bytes: int
    kv_bytes: int
    workspace_bytes: int
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


def plan_budget(budget: int | None, *, dense_bytes: int, kv_bytes: int, workspace_bytes: int, slot_bytes: int,
                total_experts: int, min_slots: int, label: str = "--vram") -> BudgetPlan:
    """Slots for experts from what the budget leaves. Too small: BudgetError with the minimum that works."""
    fixed = dense_bytes + kv_bytes + workspace_bytes
    if budget is None:
        slots = total_experts
    else:
        slots = min(total_experts, (budget - fixed) // slot_bytes) if budget > fixed else 0
        if slots < min_slots:
            minimum = fixed + min_slots * slot_bytes
            raise BudgetError(
                f"{label} {format_size(budget)} is too small: it needs at least {format_size(minimum)} "
                f"(dense weights {format_size(dense_bytes)} + KV cache {format_size(kv_bytes)} + workspace "
                f"{format_size(workspace_bytes)} + {min_slots} expert slots of {format_size(slot_bytes)}); "
                f"shorten the context, or compress harder")
    return BudgetPlan(budget, dense_bytes, kv_bytes, workspace_bytes, slot_bytes, int(slots), total_experts)
