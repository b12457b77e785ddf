"""One expert's product on the tokens routed to it: dense SwiGLU, FloE's channel-sparse SwiGLU, and the two
bypass paths (the whole expert streamed past the cache; only the kept rows of gate/down read from the pack).

A family whose experts carry biases or another nonlinearity (GPT-OSS) passes `ExpertTerms`: the gate/up
biases are added before the nonlinearity, the down bias after the down product (so the routing weight, which
the executor applies to the output, scales it too), and the clamped SwiGLU replaces silu(g) * u. The biases
are dense tensors of the pack, resident beside the router, never part of the expert blobs.

Projections are `prepared.Projection`s (typed views of an expert's parts bound to a kernel once); the plain
(parts, recipe, shape) tuples of older callers are accepted too and go through `moepack.kernels`."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moepack.format import projection_parts
from moepack.kernels import Backend, matmul, matmul_t
from moepack.runtime.adaptive import row_runs, select_channels
from moepack.runtime.prepared import Projection


def _mm(x: torch.Tensor, proj, backend: Backend, rows: torch.Tensor | None = None) -> torch.Tensor:
    if isinstance(proj, Projection):
        return proj.mm(x, rows)
    return matmul(x, *proj, rows=rows, backend=backend)


def _mm_t(h: torch.Tensor, proj, backend: Backend, rows: torch.Tensor | None = None) -> torch.Tensor:
    if isinstance(proj, Projection):
        return proj.mm_t(h, rows)
    return matmul_t(h, *proj, rows=rows, backend=backend)


@dataclass
class ExpertTerms:
    """What a family adds around an expert's three products (GPT-OSS): per sparse layer its experts' biases,
    `(gate_up [E, 2I] with gate at even and up at odd positions, down [E, H])` as the source stores them, and
    the clamped SwiGLU (limit, alpha): h = (clamp(u, -limit, limit) + 1) * g' * sigmoid(alpha * g'),
    g' = clamp(g, max=limit). `of(spec, tensors)` is None for a family with neither (plain SwiGLU, no
    biases). The runtime builds it over the model's resident dense tensors (views, no copy: the budget counts
    them once); each use widens an expert's bias row to the activations' dtype, which is exact."""

    act: str
    limit: float | None
    alpha: float
    bias: dict[int, tuple[torch.Tensor, torch.Tensor]]

    @classmethod
    def plain(cls) -> ExpertTerms:
        """Plain SwiGLU without biases (the same numbers as no terms), for code that always takes terms."""
        return cls("silu", None, 1.0, {})

    @classmethod
    def of(cls, spec, tensors, *, dtype: torch.dtype | None = None,
           device: str | torch.device | None = None) -> ExpertTerms | None:
        """From a mapping of dense tensors by name (the model's `w`, a pack's or a checkpoint's tensors),
        converted to `dtype` / moved to `device` only when given."""
        if spec.expert_act == "silu" and not spec.expert_bias:
            return None
        from moepack.arch import adapter_for

        names, bias = adapter_for(spec), {}
        for layer in spec.sparse_layer_ids if spec.expert_bias else ():
            n = names.layer_tensor_names(layer)
            bias[layer] = tuple(tensors[n[role]].to(device=device, dtype=dtype)
                                for role in ("expert_gu_bias", "expert_down_bias"))
        return cls(spec.expert_act, spec.swiglu_limit, spec.swiglu_alpha, bias)

    def _row(self, key, which: int, like: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor | None:
        """Expert key's gate (0) or up (1) bias [I] (or its `rows`), None without biases."""
        b = None if key is None else self.bias.get(key[0])  # key None: a caller without biases
        if b is None:
            return None
        row = b[0][key[1], which::2]
        return (row if rows is None else row.index_select(0, rows)).to(like.dtype)

    def up_factor(self, key, u: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The up branch as it multiplies the gate branch: u + bias (clamped, + 1 for the clamped SwiGLU)."""
        b = self._row(key, 1, u, rows)
        if b is not None:
            u = u + b
        if self.act == "clamped_swiglu":
            return u.clamp(-self.limit, self.limit) + 1
        return u

    def gate_act(self, key, g: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The gate branch: silu(g + bias), or g' * sigmoid(alpha * g') with g' = clamp(g + bias, max=limit)."""
        b = self._row(key, 0, g, rows)
        if b is not None:
            g = g + b
        if self.act == "clamped_swiglu":
            g = g.clamp(max=self.limit)
            return g * torch.sigmoid(g * self.alpha)
        return F.silu(g)

    def out(self, key, y: torch.Tensor) -> torch.Tensor:
        """The down product plus the down bias (before the routing weight)."""
        b = None if key is None else self.bias.get(key[0])
        return y if b is None else y + b[1][key[1]].to(y.dtype)


def expert_ffn(x: torch.Tensor, projs: dict, backend: Backend = Backend.AUTO, terms: ExpertTerms | None = None,
               key: tuple[int, int] | None = None) -> torch.Tensor:
    """SwiGLU expert on channel-major projections: down(silu(gate(x)) * up(x)); with `terms` (and the
    expert's `key`) the family's biases and nonlinearity.  x [T, H] -> [T, H]."""
    g = _mm(x, projs["gate"], backend)  # [T, I]
    u = _mm(x, projs["up"], backend)  # [T, I]
    if terms is None:
        return _mm_t(F.silu(g) * u, projs["down"], backend)  # [T, H]
    return terms.out(key, _mm_t(terms.gate_act(key, g) * terms.up_factor(key, u), projs["down"], backend))


def sparse_ffn(x: torch.Tensor, projs: dict, backend: Backend, keep: float, terms: ExpertTerms | None = None,
               key: tuple[int, int] | None = None) -> tuple[torch.Tensor, int]:
    """FloE: up(x) in full, then gate and down on the channels of largest |up| only (with `terms`: of the
    largest |up factor|, the value that multiplies the gate branch). -> ([T, H], rows used)."""
    u = _mm(x, projs["up"], backend)  # [T, I]
    if terms is not None:
        u = terms.up_factor(key, u)
    rows, mask = select_channels(u, keep)  # [n], [T, n] | None
    g = _mm(x, projs["gate"], backend, rows)
    h = (F.silu(g) if terms is None else terms.gate_act(key, g, rows)) * u[:, rows]  # [T, n]
    if mask is not None:
        h = h * mask
    y = _mm_t(h, projs["down"], backend, rows)
    return (y if terms is None else terms.out(key, y)), rows.numel()


def _rowwise(name: str) -> bool:
    return name != "lr_v"  # every part but the low-rank right factor has one row per channel


def partial_ffn(x: torch.Tensor, blob: torch.Tensor, record, keep: float, backend: Backend,
                counts, terms: ExpertTerms | None = None, key: tuple[int, int] | None = None
                ) -> tuple[torch.Tensor, int]:
    """A miss under partial loads: up moves whole; gate and down only for the kept rows (each contiguous run of
    rows is one byte range per part), from the mapped `blob`. Nothing is cached. -> ([T, H], bytes moved);
    `counts` gets partial_loads / partial_runs / partial_rows / partial_bytes(_saved) / rows_kept / rows_total."""
    dev, moved = x.device, 0
    up_rec = record.projections["up"]
    up = {k: v.to(dev) for k, v in projection_parts(blob, up_rec).items()}
    moved += sum(p.nbytes for p in up_rec.parts)
    u = matmul(x, up, up_rec.recipe, up_rec.shape, backend=backend)  # [T, I]
    if terms is not None:
        u = terms.up_factor(key, u)
    rows, mask = select_channels(u, keep)
    rows_cpu = rows.cpu()
    compact = {}
    for p in ("gate", "down"):
        prec = record.projections[p]
        parts = {}
        for name, t in projection_parts(blob, prec).items():
            part = t.index_select(0, rows_cpu) if _rowwise(name) else t
            parts[name] = part.to(dev)
            moved += part.numel() * part.element_size()
        compact[p] = (parts, prec.recipe, (rows.numel(), prec.shape[1]))
    g = matmul(x, *compact["gate"], backend=backend)
    h = (F.silu(g) if terms is None else terms.gate_act(key, g, rows)) * u[:, rows]
    if mask is not None:
        h = h * mask
    full = sum(p.nbytes for prec in record.projections.values() for p in prec.parts)
    counts["partial_loads"] += 1
    counts["partial_runs"] += row_runs(rows_cpu.tolist())  # contiguous reads per part of gate / down
    counts["partial_rows"] += rows.numel()
    counts["partial_bytes"] += moved
    counts["partial_bytes_saved"] += full - moved
    counts["rows_kept"] += rows.numel() * x.shape[0]
    counts["rows_total"] += up_rec.shape[0] * x.shape[0]
    y = matmul_t(h, *compact["down"], backend=backend)
    return (y if terms is None else terms.out(key, y)), moved
