"""moepack: per-expert compression and a memory-budgeted runtime for Mixture-of-Experts models."""

from moepack.errors import MoepackError

__version__ = "0.1.0"
__all__ = ["MoepackError", "__version__"]
