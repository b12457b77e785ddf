"""Recipe allocation: uniform recipes (`uniform`) and the profiled per-expert knapsack (`allocate`)."""

from moepack.plan.allocate import Allocation, allocate, expert_weights, plan_from_profile, projection_nbytes
from moepack.plan.uniform import UNIFORM_LADDER, parse_recipe_spec, uniform_for_ratio

__all__ = [
    "UNIFORM_LADDER",
    "Allocation",
    "allocate",
    "expert_weights",
    "parse_recipe_spec",
    "plan_from_profile",
    "projection_nbytes",
    "uniform_for_ratio",
]
