"""compress: source checkpoint -> (profile -> plan) -> encode each expert -> pack.

One expert is in memory at a time, so peak memory does not grow with the model."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moepack import __version__
from moepack.arch import adapter_for, spec_from_config
from moepack.codecs import decode, encode, parse_recipe
from moepack.errors import CodecError
from moepack.format import PackWriter
from moepack.format.constants import DEFAULT_SHARD_BYTES, PROJECTIONS
from moepack.plan.uniform import parse_recipe_spec, uniform_for_ratio
from moepack.source import Checkpoint, default_pack_path, resolve_source

ProgressFn = Callable[[str, int, int], None]  # (stage, done, total)
Plan = dict[tuple[int, int, str], str]  # (layer, expert, proj) -> recipe


@dataclass
class CompressReport:
    path: Path
    source: str
    model_type: str
    source_expert_bytes: int
    pack_expert_bytes: int
    dense_bytes: int
    num_experts: int
    recipes: Counter = field(default_factory=Counter)  # recipe -> projections using it
    mean_error: float = 0.0
    seconds: float = 0.0
    target_ratio: float | None = None

    @property
    def ratio(self) -> float:
        return self.source_expert_bytes / max(self.pack_expert_bytes, 1)


def load_expert(ckpt: Checkpoint, adapter, layer: int, expert: int) -> dict[str, torch.Tensor]:
    """An expert's three projections in moepack's channel-major orientation: each [I, H]."""
    out = {}
    for proj in PROJECTIONS:
        ref = adapter.expert_tensor_ref(layer, expert, proj)  # says how to slice/transpose the stored tensor
        out[proj] = ref.extract(ckpt.read(ref.name)).contiguous()
    return out


def relative_error(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    w = w.float()
    return float((w - w_hat.float()).norm() / w.norm().clamp_min(1e-12))


def compress(src: str, out: str | Path | None = None, *, recipe: str | None = None, target_ratio: float | None = None,
             plan: Plan | None = None, calib: str | Path | None = None, force: bool = False, shard_bytes: int = DEFAULT_SHARD_BYTES,
             progress: ProgressFn | None = None, frequencies: dict[tuple[int, int], float] | None = None,
             meta: dict | None = None) -> CompressReport:
    """Compress `src` into a pack. Exactly one of `recipe`, `target_ratio` or `plan` decides the recipes;
    with none, experts are stored losslessly in their source dtype."""
    t0 = time.perf_counter()
    ckpt = Checkpoint(resolve_source(src), name=str(src))
    spec = spec_from_config(ckpt.config)
    adapter = adapter_for(spec)
    out = Path(out) if out is not None else default_pack_path(src)
    layers = list(spec.sparse_layer_ids)
    expert_names = {adapter.expert_tensor_ref(layer, e, p).name
                    for layer in layers for e in range(spec.num_experts) for p in PROJECTIONS}
    dense_names = [n for n in ckpt.names() if n not in expert_names]

    src_dtype = ckpt.info(adapter.expert_tensor_ref(layers[0], 0, "gate").name)[0]
    shape = spec.expert_shape()
    chosen_by = "recipe"
    if plan is None:
        if recipe is not None and target_ratio is not None:
            raise CodecError("give --recipe or --target-ratio, not both")
        if target_ratio is not None:
            name, _ = uniform_for_ratio(target_ratio, shape, src_dtype.itemsize)
            per_proj = {p: name for p in PROJECTIONS}
            chosen_by = f"uniform recipe for target ratio {target_ratio:g}"
        elif recipe is not None:
            per_proj = parse_recipe_spec(recipe)
        else:
            lossless = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[src_dtype]
            per_proj = {p: lossless for p in PROJECTIONS}
            chosen_by = "lossless (source dtype)"
        plan = {(layer, e, p): per_proj[p] for layer in layers for e in range(spec.num_experts) for p in PROJECTIONS}
    else:
        chosen_by = "per-expert plan"

    report = CompressReport(out, str(src), spec.family, 0, 0, 0, 0, target_ratio=target_ratio)
    errors: list[float] = []
    model = {"model_type": ckpt.config.get("model_type"), "family": spec.family, "config": ckpt.config}
    source = {"id": str(src), "expert_bytes": 0, "dense_bytes": 0, "dtype": str(src_dtype).removeprefix("torch.")}
    with PackWriter(out, model=model, source=source, shard_bytes=shard_bytes, overwrite=force,
                    meta={"generator": f"moepack {__version__}", "recipes_chosen_by": chosen_by, **(meta or {})}) as writer:
        for name, data in sorted(ckpt.aux_files().items()):
            writer.add_file(name, data)
        for i, name in enumerate(dense_names):
            t = ckpt.read(name)
            writer.add_tensor(name, t)
            report.dense_bytes += t.numel() * t.element_size()
            if progress:
                progress("dense", i + 1, len(dense_names))
        total = len(layers) * spec.num_experts
        for li, layer in enumerate(layers):
            for e in range(spec.num_experts):
                weights = load_expert(ckpt, adapter, layer, e)
                encoded, errs = {}, {}
                for proj in PROJECTIONS:
                    w = weights[proj]
                    r = parse_recipe(plan[(layer, e, proj)])
                    parts = encode(w, r)
                    errs[proj] = relative_error(w, decode(parts, r, tuple(w.shape)))
                    encoded[proj] = (str(r), tuple(w.shape), parts)
                    report.recipes[str(r)] += 1
                src_bytes = sum(w.numel() * w.element_size() for w in weights.values())
                rec = writer.add_expert(layer, e, encoded, source_bytes=src_bytes, errors=errs,
                                        frequency=(frequencies or {}).get((layer, e)))
                report.source_expert_bytes += src_bytes
                report.pack_expert_bytes += rec.nbytes
                report.num_experts += 1
                errors.extend(errs.values())
                if progress:
                    progress("experts", li * spec.num_experts + e + 1, total)
        writer.source.update(expert_bytes=report.source_expert_bytes, dense_bytes=report.dense_bytes)
        writer.meta["ratio"] = round(report.ratio, 6)
        writer.finish()
    report.mean_error = sum(errors) / max(len(errors), 1)
    report.seconds = time.perf_counter() - t0
    return report
