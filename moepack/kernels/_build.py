"""Lazy, failure-tolerant loading of the compiled kernels (STYLE point 9).

Nothing is compiled at import. The first call that wants a compiled backend builds it with
`torch.utils.cpp_extension.load` (cached under ~/.cache/torch_extensions, or $TORCH_EXTENSIONS_DIR, so
only the first build in a machine's life is slow) and registers its ops with torch.library. A failed
build is remembered and reported once with a RuntimeWarning naming the reason; AUTO then uses the
TORCH reference, and asking for that backend explicitly raises KernelUnavailableError.

Environment:
  MOEPACK_DISABLE_CPP=1    never build or use the C++ CPU kernels
  MOEPACK_DISABLE_CUDA=1   never build or use the CUDA kernels
  MOEPACK_CPP_NATIVE=0     build the CPU kernels with portable -mavx2 -mfma -mf16c (when the CPU has
                           AVX2) instead of -march=native, e.g. for a cache shared between machines
"""

from __future__ import annotations

import os
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moepack.errors import KernelUnavailableError

CSRC = Path(__file__).parent / "csrc"
_TRUE = {"1", "true", "yes", "on"}


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in _TRUE


@dataclass
class LazyExtension:
    """One compiled extension: built on first `load()`, its failure remembered and warned about once."""

    label: str  # "C++" or "CUDA": for messages
    namespace: str  # torch.ops namespace the sources register
    disable_env: str
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _error: str | None = None
    _loaded: bool = False
    _warned: bool = False

    def disabled_reason(self) -> str | None:
        """Why this backend cannot be used before even trying to build it (None: go ahead)."""
        if env_flag(self.disable_env):
            return f"disabled by {self.disable_env}=1"
        return None

    def load(self):
        """Build if needed and return the torch.ops namespace, or raise KernelUnavailableError."""
        reason = self.disabled_reason()
        if reason is not None:
            raise KernelUnavailableError(f"{self.label} kernels unavailable: {reason}")
        if not self._loaded:
            with self._lock:
                if not self._loaded and self._error is None:
                    try:
                        self._build()
                        self._loaded = True
                    except Exception as e:  # a compiler or loader failure of any kind
                        self._error = _summarise(e)
        if self._error is not None:
            raise KernelUnavailableError(f"{self.label} kernels unavailable: {self._error}")
        return getattr(torch.ops, self.namespace)

    def available(self) -> bool:
        """True when the ops can be used; a build failure is warned about once, then False."""
        try:
            self.load()
            return True
        except KernelUnavailableError as e:
            if self._error is not None and not self._warned:
                self._warned = True
                warnings.warn(
                    f"moepack: {e}; falling back to the TORCH reference backend", RuntimeWarning, stacklevel=3
                )
            return False

    def reset(self) -> None:
        """Forget a failure (tests, or after fixing the toolchain); a loaded library stays loaded."""
        with self._lock:
            self._error = None
            self._warned = False

    def _build(self) -> None:
        raise NotImplementedError


def _summarise(e: Exception) -> str:
    """A short reason: the exception type and the last meaningful lines of a compiler log."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower()]
    tail = (errors or lines)[-3:]
    text = " | ".join(tail) if tail else repr(e)
    return f"{type(e).__name__}: {text[:600]}"


class CppExtension(LazyExtension):
    def __init__(self) -> None:
        super().__init__(label="C++", namespace="moepack_cpu", disable_env="MOEPACK_DISABLE_CPP")

    def _build(self) -> None:
        from torch.utils import cpp_extension

        name, arch = _cpu_arch_flags()
        cpp_extension.load(
            name=name,
            sources=[str(CSRC / "dequant_cpu.cpp")],
            extra_cflags=["-O3", "-fopenmp", *arch],
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
            verbose=env_flag("MOEPACK_VERBOSE_BUILD"),
        )


def _cpu_arch_flags() -> tuple[str, list[str]]:
    if os.environ.get("MOEPACK_CPP_NATIVE", "1").strip().lower() not in {"0", "false", "no", "off"}:
        return "moepack_cpu_native", ["-march=native"]
    cap = torch.backends.cpu.get_cpu_capability().upper()
    if "AVX2" in cap or "AVX512" in cap:
        return "moepack_cpu_avx2", ["-mavx2", "-mfma", "-mf16c"]
    return "moepack_cpu_generic", []


class CudaExtension(LazyExtension):
    def __init__(self) -> None:
        super().__init__(label="CUDA", namespace="moepack_cuda", disable_env="MOEPACK_DISABLE_CUDA")

    def disabled_reason(self) -> str | None:
        reason = super().disabled_reason()
        if reason is None and not torch.cuda.is_available():
            reason = "torch.cuda.is_available() is False"
        return reason

    def _build(self) -> None:
        from torch.utils import cpp_extension

        cpp_extension.load(
            name="moepack_cuda_kernels",
            sources=[str(CSRC / "dequant_cuda_binding.cpp"), str(CSRC / "dequant_cuda.cu")],
            extra_cflags=["-O3"],
            extra_cuda_cflags=["-O3"],
            is_python_module=False,
            verbose=env_flag("MOEPACK_VERBOSE_BUILD"),
        )


CPP = CppExtension()
CUDA = CudaExtension()
