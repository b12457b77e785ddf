"""Backend registry and the two public ops on an encoded matrix W [rows, cols] (docs/architecture.md).

    matmul(x[T, cols], parts, recipe, shape, rows=None)   -> [T, n] = x @ W[rows].T
    matmul_t(h[T, n], parts, recipe, shape, rows=None)    -> [T, cols] = h @ W[rows]

with n = len(rows) (or all rows). Every backend computes the *base* product (N:M, quant or passthrough);
a low-rank residual (`lr_u` [rows, R], `lr_v` [R, cols]) is then added in torch in factored form,
x @ V.T @ U[rows].T or h @ U[rows] @ V, whatever the backend. Passthrough recipes run the compiled kernels
where a backend serves their dtype (bf16/fp16 on CPP: widened on the fly, never upcast whole); otherwise
(fp32, or a backend without them) they are a plain torch matmul on any backend, since there is nothing to
decode. Arithmetic is float32, except on the CPP backend's blocked path (more than FUSED_MAX_T tokens): a
bfloat16 input multiplies in bf16 with float32 accumulation, and so do quantised weights for a float32 input
on CPUs with bf16 dot products (`compiled.quant_gemm`, MOEPACK_CPU_BF16=0 turns it off); the result has x's
dtype.

Backend.AUTO picks CUDA for CUDA tensors and CPP on the CPU when the recipe is supported and the
extension builds, else TORCH (the reference, which always works). An explicitly requested backend
that cannot serve a quantised or sparse recipe raises KernelUnavailableError.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

import torch

from moepack.codecs.recipe import Recipe, as_recipe
from moepack.errors import KernelUnavailableError
from moepack.kernels import compiled, reference
from moepack.kernels._build import CPP as CPP_EXT
from moepack.kernels._build import CUDA as CUDA_EXT
from moepack.kernels._build import LazyExtension

__all__ = ["Backend", "KernelImpl", "matmul", "matmul_t", "resolve_backend", "registry", "available_backends"]


class Backend(str, Enum):
    AUTO = "auto"
    TORCH = "torch"
    CPP = "cpp"
    CUDA = "cuda"

    @classmethod
    def parse(cls, value: Backend | str) -> Backend:
        if isinstance(value, Backend):
            return value
        try:
            return cls(str(value).strip().lower())
        except ValueError:
            names = ", ".join(b.value for b in cls)
            raise KernelUnavailableError(f"unknown kernel backend {value!r}; choose one of {names}") from None


# A base-product implementation: (x or h float32, parts, base recipe, cols, rows, wide) -> float32 product,
# `wide` the dtype a backend may multiply large token blocks in (float32 or bfloat16).
BaseOp = Callable[[torch.Tensor, dict, Recipe, int, "torch.Tensor | None", torch.dtype], torch.Tensor]


@dataclass(frozen=True)
class KernelImpl:
    """One backend: which device it runs on, which recipes it serves, and its two base ops."""

    backend: Backend
    device_type: str | None  # None: any device
    supports: Callable[[Recipe], bool]  # the base recipe (no low-rank term)
    unavailable: Callable[[], str | None]  # None when usable, else the reason (may build lazily)
    matmul: BaseOp
    matmul_t: BaseOp


def _compiled_impl(backend: Backend, ext: LazyExtension, device_type: str) -> KernelImpl:
    def unavailable() -> str | None:
        try:
            ext.load()
            return None
        except KernelUnavailableError as e:
            return str(e)

    return KernelImpl(
        backend=backend,
        device_type=device_type,
        supports=lambda recipe: compiled.supports(recipe, device_type),
        unavailable=unavailable,
        matmul=lambda x, p, r, c, rows, wide: compiled.matmul(ext, x, p, r, c, rows, wide),
        matmul_t=lambda h, p, r, c, rows, wide: compiled.matmul_t(ext, h, p, r, c, rows, wide),
    )


_REGISTRY: dict[Backend, KernelImpl] = {
    Backend.TORCH: KernelImpl(  # the reference: always float32
        Backend.TORCH, None, lambda r: True, lambda: None,
        lambda x, p, r, c, rows, wide: reference.matmul(x, p, r, c, rows),
        lambda h, p, r, c, rows, wide: reference.matmul_t(h, p, r, c, rows),
    ),
    Backend.CPP: _compiled_impl(Backend.CPP, CPP_EXT, "cpu"),
    Backend.CUDA: _compiled_impl(Backend.CUDA, CUDA_EXT, "cuda"),
}
_EXTENSIONS = {Backend.CPP: CPP_EXT, Backend.CUDA: CUDA_EXT}


def registry() -> dict[Backend, KernelImpl]:
    return dict(_REGISTRY)


def available_backends() -> list[Backend]:
    """Backends usable in this process (builds the compiled ones if not yet built)."""
    return [b for b, impl in _REGISTRY.items() if impl.unavailable() is None]


def resolve_backend(backend: Backend | str, recipe: Recipe | str, device: torch.device | str) -> Backend:
    """The backend that will compute a product of `recipe` on `device` (see module docstring)."""
    backend, recipe, device = Backend.parse(backend), as_recipe(recipe), torch.device(device)
    if backend is Backend.AUTO:
        want = {"cuda": Backend.CUDA, "cpu": Backend.CPP}.get(device.type)
        if want is not None and _REGISTRY[want].supports(recipe) and _EXTENSIONS[want].available():
            return want
        return Backend.TORCH
    impl = _REGISTRY[backend]
    if impl.device_type is not None and impl.device_type != device.type:
        raise KernelUnavailableError(f"{backend.value} kernels run on {impl.device_type}, not on {device}")
    if not impl.supports(recipe):
        raise KernelUnavailableError(
            f"{backend.value} kernels support {compiled.describe(impl.device_type)}, not recipe {recipe}"
        )
    reason = impl.unavailable()
    if reason is not None:
        raise KernelUnavailableError(reason)
    return backend


def kernel_name(backend: Backend | str, recipe: Recipe | str, device: torch.device | str) -> str:
    """The kernels a product of `recipe` runs on, in words: torch, cuda, or cpp-<ISA path> (cpp-avx512-vnni,
    cpp-avx2, ...), as `moepack doctor` and `run --stats` name them; for a quantised recipe on the CPP backend
    also the dtype of its many-token (prefill) GEMM for float32 inputs: "cpp-avx512-vnni (prefill bf16)"."""
    recipe = as_recipe(recipe)
    chosen = resolve_backend(backend, recipe, device)
    if chosen is Backend.CPP:
        name = "cpp-" + CPP_EXT.load().isa().replace("_", "-")
        if recipe.quantized:
            wide = compiled.wide_dtype(recipe, torch.float32, "cpu")
            name += f" (prefill {'bf16' if wide == torch.bfloat16 else 'fp32'})"
        return name
    return chosen.value


def matmul(
    x: torch.Tensor,
    parts: dict[str, torch.Tensor],
    recipe: Recipe | str,
    shape: tuple[int, int],
    rows: torch.Tensor | None = None,
    backend: Backend | str = Backend.AUTO,
) -> torch.Tensor:
    """x [T, cols] -> x @ W[rows].T [T, n], in x's dtype."""
    recipe, (nrows, cols) = as_recipe(recipe), shape
    _check_2d("x", x, cols)
    rows = _check_rows(rows, nrows, x.device)
    x32 = x.float()
    if rows is not None and rows.numel() == 0:
        return x.new_zeros(x.shape[0], 0)
    base = _base_recipe(recipe)
    impl = _base_impl(backend, base, x.device)
    if impl is not None:
        out = impl.matmul(x32.contiguous(), parts, base, cols, rows, compiled.wide_dtype(base, x.dtype, x.device.type))
    else:  # passthrough without a kernel for its dtype
        out = x32 @ _rows_of(parts["values"], rows).to(x.device, torch.float32).T
    if recipe.rank:
        u = _rows_of(parts["lr_u"], rows).to(x.device, torch.float32)  # [n, R]
        v = parts["lr_v"].to(x.device, torch.float32)  # [R, cols]
        out = out + (x32 @ v.T) @ u.T
    return out.to(x.dtype)


def matmul_t(
    h: torch.Tensor,
    parts: dict[str, torch.Tensor],
    recipe: Recipe | str,
    shape: tuple[int, int],
    rows: torch.Tensor | None = None,
    backend: Backend | str = Backend.AUTO,
) -> torch.Tensor:
    """h [T, n] -> h @ W[rows] [T, cols], in h's dtype."""
    recipe, (nrows, cols) = as_recipe(recipe), shape
    rows = _check_rows(rows, nrows, h.device)
    _check_2d("h", h, rows.shape[0] if rows is not None else nrows)
    h32 = h.float()
    if rows is not None and rows.numel() == 0:
        return h.new_zeros(h.shape[0], cols)
    base = _base_recipe(recipe)
    impl = _base_impl(backend, base, h.device)
    if impl is not None:
        out = impl.matmul_t(h32.contiguous(), parts, base, cols, rows, compiled.wide_dtype(base, h.dtype, h.device.type))
    else:  # passthrough without a kernel for its dtype
        out = h32 @ _rows_of(parts["values"], rows).to(h.device, torch.float32)
    if recipe.rank:
        u = _rows_of(parts["lr_u"], rows).to(h.device, torch.float32)  # [n, R]
        v = parts["lr_v"].to(h.device, torch.float32)  # [R, cols]
        out = out + (h32 @ u) @ v
    return out.to(h.dtype)


@functools.lru_cache(maxsize=256)
def _base_recipe(recipe: Recipe) -> Recipe:
    """The recipe without its low-rank term (cached: asked on every product)."""
    return dataclasses.replace(recipe, rank=0)


def _base_impl(backend: Backend | str, base: Recipe, device: torch.device) -> KernelImpl | None:
    """The implementation of a base product, or None for a passthrough recipe that the chosen backend has no
    kernel for (a plain torch matmul then: there is nothing to decode)."""
    backend = Backend.parse(backend)
    if base.quantized or base.sparse or backend is Backend.AUTO:
        want = resolve_backend(backend, base, device)
        return None if want is Backend.TORCH and not (base.quantized or base.sparse) else _REGISTRY[want]
    impl = _REGISTRY[backend]  # an explicit backend and a passthrough recipe
    if backend is Backend.TORCH or impl.device_type != device.type or not impl.supports(base):
        return None
    reason = impl.unavailable()
    if reason is not None:
        raise KernelUnavailableError(reason)
    return impl


def _rows_of(t: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    return t if rows is None else t.index_select(0, rows.to(t.device))


def _check_2d(name: str, t: torch.Tensor, cols: int) -> None:
    if t.dim() != 2 or t.shape[1] != cols:
        raise ValueError(f"{name} must be [T, {cols}], got {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {t.dtype}")


def _check_rows(rows: torch.Tensor | None, nrows: int, device: torch.device) -> torch.Tensor | None:
    """rows as a contiguous int64 vector on `device`, every index in [0, nrows)."""
    if rows is None:
        return None
    rows = torch.as_tensor(rows)
    if rows.dim() != 1 or rows.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise ValueError(f"rows must be a 1-D integer tensor, got {rows.dtype} {tuple(rows.shape)}")
    rows = rows.to(device=device, dtype=torch.int64).contiguous()
    # checked on the CPU only: on a GPU the check would synchronise every call
    if rows.numel() and rows.device.type == "cpu" and (int(rows.min()) < 0 or int(rows.max()) >= nrows):
        raise IndexError(f"rows must lie in [0, {nrows}), got [{int(rows.min())}, {int(rows.max())}]")
    return rows
