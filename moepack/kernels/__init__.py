"""Dequantise-and-multiply kernels behind a backend registry (docs/architecture.md, "Kernels").

`matmul(x, parts, recipe, shape, rows=None, backend=Backend.AUTO)` = x @ W[rows].T and
`matmul_t(h, parts, recipe, shape, rows=None, backend=Backend.AUTO)` = h @ W[rows] on an encoded matrix
W. TORCH (decode with the codec reference, then multiply) always works and defines the numbers; CPP
(fused C++ kernels, one build holding generic, AVX2, AVX-512 and AVX-512 VNNI code chosen on the CPU
at run time, threads from torch's pool) and CUDA are compiled lazily on first use, never at import.
`moepack doctor` (kernels/check.py) builds them ahead of time and checks every path.
"""

from moepack.kernels.ops import (
    Backend,
    KernelImpl,
    available_backends,
    kernel_name,
    matmul,
    matmul_t,
    registry,
    resolve_backend,
)

__all__ = ["Backend", "KernelImpl", "available_backends", "kernel_name", "matmul", "matmul_t", "registry", "resolve_backend"]
