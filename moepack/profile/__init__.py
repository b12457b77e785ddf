"""Calibration statistics per expert: routing frequency, input statistics, candidate recipes' output errors.

    prof = profile("path/to/checkpoint", calib=None, candidates=DEFAULT_CANDIDATES, progress=None)
    prof.frequencies()   # {(layer, expert): share of the layer's routed token slots}
    prof.error_table()   # {(layer, expert, proj): {recipe: relative squared output error}}
    prof.importance(layer, expert, proj)   # the activation-aware encode weighting ([H] or None)
"""

from moepack.profile.calib import Calibration, default_calibration_text, load_calibration
from moepack.profile.profiler import (
    DEFAULT_CANDIDATES,
    ERROR_KIND,
    ExpertProfile,
    Profile,
    measure_errors,
    profile,
)

__all__ = [
    "DEFAULT_CANDIDATES",
    "ERROR_KIND",
    "Calibration",
    "ExpertProfile",
    "Profile",
    "default_calibration_text",
    "load_calibration",
    "measure_errors",
    "profile",
]
