"""Lazy, failure-tolerant, hang-free building of the compiled kernels (STYLE point 9).

Nothing is compiled at import. The first call that wants a compiled backend builds it with
`torch.utils.cpp_extension.load` and registers its ops with torch.library. A failed build is remembered
and reported once with a RuntimeWarning naming the reason; AUTO then uses the TORCH reference, and asking
for that backend explicitly raises KernelUnavailableError.

The C++ build folder is keyed by a hash of the sources, the torch and Python versions, the compiler and
the flags (`moepack_cpu-<hash>` under $TORCH_EXTENSIONS_DIR or ~/.cache/torch_extensions), so two
checkouts or virtual environments never rebuild each other's kernels, and a finished build (marked by a
`built.ok` file) is loaded directly, without taking a lock. One build is portable: the sources compile
one variant per instruction set (generic, AVX2, AVX-512, AVX-512 VNNI) with target pragmas, and the
library picks the best one the CPU has at run time (never -march=native).

Builders serialise on `moepack.lock` in the build folder with an advisory `flock`, which the kernel
releases when its holder dies, so a process killed mid-build never blocks later ones; the lock file
records the holder's PID for messages. Holding it, a leftover torch `lock` file (torch's own baton,
which waits forever) can only come from a killed build and is removed. The wait is bounded
(MOEPACK_BUILD_TIMEOUT seconds): past it the C++ backend is unavailable for this process, with one
warning, and AUTO uses TORCH. "compiling kernels (once)" is printed on stderr while building.

Environment:
  MOEPACK_DISABLE_CPP=1      never build or use the C++ CPU kernels
  MOEPACK_DISABLE_CUDA=1     never build or use the CUDA kernels
  MOEPACK_BUILD_TIMEOUT=S    seconds to wait for another process's build (default 600)
  MOEPACK_CPU_ISA=NAME       use a lower CPU code path: generic, avx2, avx512 or avx512_vnni
  MOEPACK_CPU_Q8=N           q2/q4 products of up to 8 tokens: 2 (default) int8 activations in two
                             planes (about 15 bits), 1 one int8 plane (as llama.cpp's q8), 0 the fp32
                             kernels (exact up to summation order; slower)
  MOEPACK_CPU_BF16=N         quantised products of more than 8 tokens (prefill) with float32 inputs: 1
                             (default) in bf16 with float32 accumulation where the CPU has AVX-512 BF16
                             or AMX (>= 45 dB SQNR, kernels/check.py), else float32; 0 always float32
                             (exact up to summation order). Read once (kernels/compiled.py: quant_gemm)
  MOEPACK_VERBOSE_BUILD=1    show the compiler's output
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import platform
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moepack.errors import KernelUnavailableError
from moepack.procs import pid_alive

CSRC = Path(__file__).parent / "csrc"
CPU_SOURCES = ("dequant_cpu.cpp", "isa_generic.cpp", "isa_avx2.cpp", "isa_avx512.cpp", "isa_avx512_vnni.cpp",
               "cpu_layer.cpp")
CPU_CFLAGS = ("-O3", "-fopenmp", "-fno-math-errno")
CPU_LDFLAGS = ("-fopenmp",)
DEFAULT_BUILD_TIMEOUT = 600.0
LOCK_NAME, DONE_NAME = "moepack.lock", "built.ok"
_TRUE = {"1", "true", "yes", "on"}


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in _TRUE


def build_timeout() -> float:
    raw = os.environ.get("MOEPACK_BUILD_TIMEOUT", "").strip()
    try:
        return max(0.0, float(raw)) if raw else DEFAULT_BUILD_TIMEOUT
    except ValueError:
        raise KernelUnavailableError(f"MOEPACK_BUILD_TIMEOUT must be a number of seconds, got {raw!r}") from None


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
    if isinstance(e, KernelUnavailableError):
        return str(e)
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower()]
    tail = (errors or lines)[-3:]
    text = " | ".join(tail) if tail else repr(e)
    return f"{type(e).__name__}: {text[:600]}"


def build_root() -> Path:
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    return Path(root) if root else Path.home() / ".cache" / "torch_extensions"


def build_key(sources: list[Path], cflags: list[str], ldflags: list[str]) -> str:
    """A hash of everything that changes the built library: sources, flags, torch, Python, compiler."""
    h = hashlib.sha256()
    for p in sources:
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    env = [torch.__version__, sys.version.split()[0], platform.machine(), os.environ.get("CXX", "c++")]
    for item in (*cflags, "|", *ldflags, "|", *env):
        h.update(item.encode() + b"\0")
    return h.hexdigest()[:16]


@contextlib.contextmanager
def build_lock(folder: Path, timeout: float, poll: float = 0.1):
    """Hold the exclusive build lock of `folder` (waiting at most `timeout` s), and clear what a killed
    build left: torch's `lock` baton. Yields a note naming what was recovered (or None)."""
    import fcntl

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline, said = time.monotonic() + timeout, False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise
                if not said:
                    said, holder = True, _read_pid(path)
                    who = f"process {holder}" if holder else "another process"
                    print(f"moepack: waiting for {who} to compile the kernels (at most {timeout:g} s)",
                          file=sys.stderr, flush=True)
                if time.monotonic() >= deadline:
                    holder = _read_pid(path)
                    who = f"process {holder}" if holder else "another process"
                    raise KernelUnavailableError(
                        f"{who} has held the kernel build lock {path} for more than {timeout:g} s "
                        "(MOEPACK_BUILD_TIMEOUT); not waiting longer"
                    ) from None
                time.sleep(poll)
        notes = []
        old = _read_pid(path)
        if old and old != os.getpid() and not pid_alive(old):
            notes.append(f"a build by process {old}, which is gone, was interrupted")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        baton = folder / "lock"
        if baton.exists():  # only a killed builder leaves torch's baton while nobody holds our lock
            baton.unlink(missing_ok=True)
            notes.append("removed its stale torch build lock")
        try:
            yield "; ".join(notes) or None
        finally:
            os.ftruncate(fd, 0)  # a PID left behind means its build was killed
    finally:
        os.close(fd)  # releases the flock


def _read_pid(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
        return int(text) if text else None
    except (OSError, ValueError):
        return None


class CppExtension(LazyExtension):
    def __init__(self, root: Path | None = None, timeout: float | None = None) -> None:
        super().__init__(label="C++", namespace="moepack_cpu", disable_env="MOEPACK_DISABLE_CPP")
        self.root, self.timeout = root, timeout
        self.build_seconds: float | None = None  # time spent compiling in this process (None: was cached)

    def build_dir(self) -> tuple[str, Path]:
        """(library name, build folder) for these sources, flags and toolchain."""
        sources = [CSRC / s for s in CPU_SOURCES] + sorted(CSRC.glob("cpu_*.h"))  # every header they include
        key = build_key(sources, list(CPU_CFLAGS), list(CPU_LDFLAGS))
        return f"moepack_cpu_{key}", (self.root or build_root()) / f"moepack_cpu-{key}"

    def _build(self) -> None:
        name, folder = self.build_dir()
        lib = folder / f"{name}.so"
        if not ((folder / DONE_NAME).exists() and lib.exists()):
            timeout = self.timeout if self.timeout is not None else build_timeout()
            with build_lock(folder, timeout) as note:
                if not ((folder / DONE_NAME).exists() and lib.exists()):
                    self._compile(name, folder, note)
        torch.ops.load_library(str(lib))
        isa = os.environ.get("MOEPACK_CPU_ISA", "").strip().lower()
        if isa:
            torch.ops.moepack_cpu.set_isa(isa)
        planes = os.environ.get("MOEPACK_CPU_Q8", "").strip().lower()
        if planes:
            if planes not in {"0", "1", "2"}:
                raise KernelUnavailableError(f"MOEPACK_CPU_Q8 must be 0, 1 or 2, got {planes!r}")
            torch.ops.moepack_cpu.set_q8(int(planes))

    def _compile(self, name: str, folder: Path, note: str | None) -> None:
        from torch.utils import cpp_extension

        if note:
            print(f"moepack: {note}", file=sys.stderr, flush=True)
        print("moepack: compiling kernels (once) ...", file=sys.stderr, flush=True)
        t0 = time.monotonic()
        cpp_extension.load(
            name=name,
            sources=[str(CSRC / s) for s in CPU_SOURCES],
            extra_cflags=list(CPU_CFLAGS),
            extra_ldflags=list(CPU_LDFLAGS),
            build_directory=str(folder),
            is_python_module=False,
            verbose=env_flag("MOEPACK_VERBOSE_BUILD"),
        )
        self.build_seconds = time.monotonic() - t0
        (folder / DONE_NAME).write_text(f"{name}\n")
        print(f"moepack: kernels compiled in {self.build_seconds:.0f} s", file=sys.stderr, flush=True)


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
