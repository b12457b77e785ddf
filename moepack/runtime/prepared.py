"""Kernel calls bound once: an encoded matrix's backend, base recipe and typed parts are resolved when the
matrix is prepared (per load into a slot, per expert, per dense weight), not on every product.

`moepack.kernels.matmul` resolves the backend on each call (it may read the environment and checks the
extension); the runtime calls the chosen backend's base op (`KernelImpl.matmul` / `matmul_t`) directly,
through a `Projection` that also carries the parts as the kernels' typed views. Recipes with a low-rank
term or N:M sparsity keep the generic op (with the backend resolved once), which adds their terms.

Every bound call adds its duration to `CLOCK` (kernel and copy time), so the engine can report the host
time of a layer as its wall time minus what the kernels and copies took (`host_overhead_s_per_layer`).
On CUDA a kernel call returns once launched: the figure is then the host time outside the launches."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from time import perf_counter

import torch
import torch.nn.functional as F

from moepack.codecs.recipe import Recipe, as_recipe
from moepack.format import projection_parts
from moepack.format.constants import PROJECTIONS
from moepack.kernels import Backend, matmul, matmul_t, registry, resolve_backend
from moepack.kernels._build import CPP as CPP_EXT
from moepack.kernels._build import CUDA as CUDA_EXT
from moepack.kernels.compiled import FUSED_MAX_T, quant_args, wide_dtype


class KernelClock:
    """Seconds spent inside kernel calls and copies since the last `reset` (one per process: the engine
    resets it around its own forward)."""

    __slots__ = ("s",)

    def __init__(self) -> None:
        self.s = 0.0

    def reset(self) -> None:
        self.s = 0.0


CLOCK = KernelClock()

Op = Callable[..., torch.Tensor]


def _timed(fn: Op) -> Op:
    def call(*args):
        t0 = perf_counter()
        y = fn(*args)
        CLOCK.s += perf_counter() - t0
        return y
    return call


def bind(parts: dict[str, torch.Tensor], recipe: Recipe | str, shape: tuple[int, int], backend: Backend,
         device: torch.device) -> tuple[Op, Op]:
    """(mm(x, rows=None) = x @ W[rows].T, mm_t(h, rows=None) = h @ W[rows]) for an encoded matrix W,
    each in its input's dtype, timed on CLOCK. The backend is resolved here, once."""
    recipe = as_recipe(recipe)
    base = dataclasses.replace(recipe, rank=0)
    want = resolve_backend(backend, base, device) if (base.quantized or base.sparse or backend is Backend.AUTO) \
        else backend
    impl = registry()[want]
    direct = (not recipe.rank and not recipe.sparse and (base.quantized or impl.device_type == device.type)
              and impl.supports(base) and impl.unavailable() is None)
    cols = shape[1]
    if not direct:  # low-rank, N:M, or a passthrough the backend has no kernel for: the generic ops
        def mm(x, rows=None):
            return matmul(x, parts, recipe, shape, rows, backend=want)

        def mm_t(h, rows=None):
            return matmul_t(h, parts, recipe, shape, rows, backend=want)
        return _timed(mm), _timed(mm_t)
    fused, fused_t = _fused_ops(want, parts, base, cols, device)
    wide = wide_dtype(base, torch.float32, device.type)  # many tokens, float32 inputs: bf16 for lossy weights
    return (_op(fused, impl.matmul, parts, base, cols, wide), _op(fused_t, impl.matmul_t, parts, base, cols, wide))


def _op(fused, base_op, parts: dict, base: Recipe, cols: int, wide32: torch.dtype) -> Op:
    """One bound product: the fused op for up to FUSED_MAX_T tokens where there is one, else the backend's
    base op, which multiplies in bf16 for bf16 inputs and in `wide32` for the others; float32 in and out
    (other inputs converted), timed on CLOCK."""
    def call(x, rows=None):
        t0 = perf_counter()
        dtype = x.dtype
        x32 = x if dtype == torch.float32 and x.is_contiguous() else x.float().contiguous()
        if fused is not None and x.shape[0] <= FUSED_MAX_T:
            y = fused(x32, rows)
        else:
            y = base_op(x32, parts, base, cols, rows, torch.bfloat16 if dtype == torch.bfloat16 else wide32)
        CLOCK.s += perf_counter() - t0
        return y if dtype == torch.float32 else y.to(dtype)
    return call


def _fused_ops(backend: Backend, parts: dict, base: Recipe, cols: int, device: torch.device):
    """The compiled fused ops for a few tokens with their arguments bound ((None, None) where there are none):
    kernels/compiled.py's `matmul` for T <= FUSED_MAX_T, without its per-call extension check and part
    conversions (the parts are already contiguous on the device)."""
    ext = {Backend.CPP: CPP_EXT, Backend.CUDA: CUDA_EXT}.get(backend)
    if ext is None:
        return None, None
    ops = ext.load()
    if base.quantized:
        codes, scale, zero, rowq = quant_args(parts, device)  # rowq: q{b}g{G}d metadata, else None
        bits, group = base.bits, base.group
        return (lambda x, rows: ops.qmatmul(x, codes, scale, zero, rows, bits, group, rowq),
                lambda h, rows: ops.qmatmul_t(h, codes, scale, zero, rows, bits, group, cols, rowq))
    values = parts["values"].to(device)
    if values.shape[1] % 32 or backend is not Backend.CPP:
        return None, None
    return (lambda x, rows: ops.pmatmul(x, values, rows), lambda h, rows: ops.pmatmul_t(h, values, rows))


class Projection(tuple):
    """One projection of an expert: the tuple (parts, recipe, shape) that `moepack.kernels.matmul` takes, plus
    its bound ops `mm` and `mm_t` (see `bind`)."""

    def __new__(cls, parts: dict, recipe: str, shape: tuple[int, int], backend: Backend, device: torch.device):
        self = super().__new__(cls, (parts, recipe, tuple(shape)))
        self.mm, self.mm_t = bind(parts, recipe, tuple(shape), backend, device)
        self.rows = shape[0]
        return self


def expert_projections(blob: torch.Tensor, record, backend: Backend) -> dict[str, Projection]:
    """The typed views of an expert's projections inside its blob (on the blob's device), bound to kernels."""
    return {p: Projection(projection_parts(blob, record.projections[p]), record.projections[p].recipe,
                          record.projections[p].shape, backend, blob.device) for p in PROJECTIONS}


class Dense:
    """A dense weight w [out, in] of the model, applied as x @ w.T (+ bias). A 16-bit matrix that the CPU kernels
    widen on the fly (`widen`) goes through them; otherwise a torch linear in the compute dtype."""

    __slots__ = ("w", "bias", "mm")

    def __init__(self, w: torch.Tensor, bias: torch.Tensor | None, *, widen: bool, backend: Backend):
        self.w, self.bias = w, bias
        wide = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(w.dtype)
        if widen and wide is not None:
            mm, _ = bind({"values": w}, wide, tuple(w.shape), backend, w.device)
            self.mm = mm
        else:
            self.mm = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.mm is None:
            t0 = perf_counter()
            y = F.linear(x, self.w, self.bias)
            CLOCK.s += perf_counter() - t0
            return y
        y = self.mm(x if x.dim() == 2 else x.reshape(-1, x.shape[-1]))
        if x.dim() != 2:
            y = y.view(*x.shape[:-1], y.shape[-1])
        return y if self.bias is None else y + self.bias
