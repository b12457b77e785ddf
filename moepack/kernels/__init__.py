"""Dequantise-and-multiply kernels behind a backend registry (docs/architecture.md, "Kernels").

`matmul(x, parts, recipe, shape, rows=None, backend=Backend.AUTO)` = x @ W[rows].T and
`matmul_t(h, parts, recipe, shape, rows=None, backend=Backend.AUTO)` = h @ W[rows] on an encoded matrix
W. TORCH (decode with the codec reference, then multiply) always works and defines the numbers; CPP
(fused C++/AVX2/OpenMP) and CUDA are compiled lazily on first use, never at import.
"""

from moepack.kernels.ops import (
    Backend,
    KernelImpl,
    available_backends,
    matmul,
    matmul_t,
    registry,
    resolve_backend,
)

__all__ = ["Backend", "KernelImpl", "available_backends", "matmul", "matmul_t", "registry", "resolve_backend"]
