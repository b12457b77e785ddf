"""compress: source checkpoint -> (profile -> plan) -> encode each expert -> pack.

One expert is in memory at a time, so peak memory does not grow with the model (profiling too reads one
expert at a time, see moepack.profile). How the recipes are chosen:

- `target_ratio` (the default path): profile the experts on calibration text, allocate a recipe per expert
  projection with the knapsack of moepack.plan.allocate, encode with the activation statistics;
- `target_ratio` with `uniform=True`: the most faithful uniform recipe that reaches the ratio;
- `recipe`: one recipe (or one per projection kind) everywhere; with `calib` the experts are profiled too,
  so the pack records frequencies and output errors and encodes activation-aware;
- `plan`: an explicit (layer, expert, proj) -> recipe mapping; none of these: lossless."""

from __future__ import annotations

import math
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moepack import __version__
from moepack.arch import adapter_for, spec_from_config
from moepack.codecs import decode, encode, parse_recipe, quantize_rtn
from moepack.errors import CodecError, ConfigError
from moepack.format import PackWriter
from moepack.format.constants import DEFAULT_SHARD_BYTES, EXPERT_ALIGNMENT, PROJECTIONS, SHARD_HEADER_BYTES
from moepack.format.publish import OutputLock, check_output, output_path, recover_locked, sweep_stale
from moepack.plan.allocate import Allocation, check_reachable, plan_from_profile
from moepack.plan.uniform import parse_recipe_spec, uniform_for_ratio
from moepack.profile.profiler import (
    DEFAULT_CANDIDATES,
    ERROR_KIND,
    EXTREME_CANDIDATES,
    Profile,
    usable_candidates,
)
from moepack.source import Checkpoint, default_pack_path, resolve_source

ProgressFn = Callable[[str, int, int], None]  # (stage, done, total)
NoticeFn = Callable[[str], None]  # something the user should know (a recovered pack, a removed partial)
MIN_SHARD_BYTES = SHARD_HEADER_BYTES + EXPERT_ALIGNMENT  # a shard header and one aligned record
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
    expected_error: float | None = None  # the planner's frequency-weighted relative squared output error per layer
    planned_ratio: float | None = None
    profile_seconds: float | None = None
    calibration_tokens: int | None = None
    notices: list[str] = field(default_factory=list)  # what compress repaired or removed before writing

    @property
    def ratio(self) -> float:
        return self.source_expert_bytes / max(self.pack_expert_bytes, 1)


def load_expert(ckpt: Checkpoint, adapter, layer: int, expert: int) -> dict[str, torch.Tensor]:
    """An expert's three projections in moepack's channel-major orientation: each [I, H]. From a fused
    [E, ...] tensor only this expert's slice is read (once for gate and up, which share one tensor)."""
    out, slices = {}, {}
    for proj in PROJECTIONS:
        ref = adapter.expert_tensor_ref(layer, expert, proj)  # says how to slice/transpose the stored tensor
        if ref.index is None:
            out[proj] = ref.extract(ckpt.read(ref.name), ref.scales and ckpt.read(ref.scales)).contiguous()
            continue
        key = (ref.name, ref.index)
        if key not in slices:
            slices[key] = (ckpt.read(ref.name, ref.index), ref.scales and ckpt.read(ref.scales, ref.index))
        out[proj] = ref.local().extract(*slices[key]).contiguous()
    return out


MXFP4_BYTES_PER_WEIGHT = 4.25 / 8  # a 4-bit code per weight and one scale byte per 32


def source_format(ckpt: Checkpoint, adapter, layer: int) -> tuple[torch.dtype, float, str]:
    """(dtype the experts are read in, stored bytes per expert weight, source format name): an MXFP4 source
    decodes exactly to bfloat16 (moepack.source.mxfp4) and counts its stored 4.25 bits per weight, so
    ratios and --target-ratio are against the bytes the checkpoint really holds."""
    ref = adapter.expert_tensor_ref(layer, 0, "gate")
    if ref.scales is not None:
        return torch.bfloat16, MXFP4_BYTES_PER_WEIGHT, "mxfp4"
    dtype = ckpt.info(ref.name)[0]
    return dtype, dtype.itemsize, str(dtype).removeprefix("torch.")


def expert_stored_names(adapter, layers, num_experts: int) -> set[str]:
    """Every checkpoint tensor the experts are read from (MXFP4: blocks and scales); the rest is dense."""
    refs = [adapter.expert_tensor_ref(layer, e, p) for layer in layers for e in range(num_experts) for p in PROJECTIONS]
    return {r.name for r in refs} | {r.scales for r in refs if r.scales}


def reorder_expert_bias(adapter, spec, name: str, t: torch.Tensor, profile) -> torch.Tensor:
    """A fused gate/up bias [E, 2I] (gate/up interleaved) in the channel order the profile gives each expert,
    so it stays aligned with the reordered expert rows (GPT-OSS; other tensors pass unchanged)."""
    for layer in spec.sparse_layer_ids:
        if adapter.layer_tensor_names(layer).get("expert_gu_bias") == name:
            t = t.clone()
            pairs = t.view(spec.num_experts, spec.moe_intermediate_size, 2)
            for e in range(spec.num_experts):
                order = profile.experts[(layer, e)].channel_order
                if order is not None:
                    pairs[e] = pairs[e][order]
    return t


WEIGHT_ERROR = "relative weight error ||W - W^|| / ||W||"
# a profiled pack stores each expert's intermediate channels in this order (the function is unchanged)
CHANNEL_ORDER = "by FloE selection frequency on the calibration text, most selected first, per expert"


def relative_error(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    w = w.float()
    return float((w - w_hat.float()).norm() / w.norm().clamp_min(1e-12))


def encode_rtn(w: torch.Tensor, r) -> dict[str, torch.Tensor]:
    """Plain min/max round-to-nearest group quantisation (the benchmark baseline); only q{b}g{G} recipes."""
    if r.bits is None or r.sparse or r.rank or r.dq:
        raise CodecError(f"round-to-nearest applies to plain q{{b}}g{{G}} recipes, not {r}")
    return quantize_rtn(w, r.bits, r.group)


def check_options(*, recipe: str | None, target_ratio: float | None, shard_bytes: int) -> None:
    """Refuse bad option values before anything is loaded or profiled (ConfigError naming the option)."""
    if recipe is not None and target_ratio is not None:
        raise ConfigError("give --recipe or --target-ratio, not both")
    if target_ratio is not None:
        if isinstance(target_ratio, bool) or not isinstance(target_ratio, (int, float)):
            raise ConfigError(f"--target-ratio must be a number, got {target_ratio!r}")
        if not math.isfinite(target_ratio) or target_ratio <= 1:
            raise ConfigError(f"--target-ratio must be a finite number above 1 (source expert bytes / packed "
                              f"expert bytes), got {target_ratio:g}; for a lossless pack give neither "
                              f"--target-ratio nor --recipe")
    if isinstance(shard_bytes, bool) or not isinstance(shard_bytes, int) or shard_bytes < MIN_SHARD_BYTES:
        raise ConfigError(f"--shard-size must be at least {MIN_SHARD_BYTES} bytes (a shard header and one "
                          f"aligned record), got {shard_bytes!r}")


def compress(src: str, out: str | Path | None = None, *, recipe: str | None = None, target_ratio: float | None = None,
             plan: Plan | None = None, calib: str | Path | None = None, force: bool = False, shard_bytes: int = DEFAULT_SHARD_BYTES,
             progress: ProgressFn | None = None, frequencies: dict[tuple[int, int], float] | None = None,
             meta: dict | None = None, uniform: bool = False, candidates: Sequence[str] | None = None,
             profile: Profile | None = None, rtn: bool = False, notice: NoticeFn | None = None) -> CompressReport:
    """Compress `src` into a pack. Exactly one of `recipe`, `target_ratio` or `plan` decides the recipes (see
    the module docstring); with none, experts are stored losslessly in their source dtype. `profile` reuses a
    finished `moepack.profile.profile(...)` instead of profiling again; `candidates` are the recipes the
    profiler measures and the planner chooses from (default moepack.profile.DEFAULT_CANDIDATES). `rtn` encodes
    plain group-quantisation recipes with min/max round-to-nearest instead of the optimised quantiser: the
    baseline of benchmarks/quality.py (same format, same bytes).

    Before loading anything: bad option values are refused (ConfigError); the output path is locked for the
    whole run (OutputInUseError if another compress writes it); what killed compresses left there is repaired
    or removed (each action is passed to `notice`, default: printed on stderr, and kept in the report's
    `notices`); an existing path is refused unless it is a pack and `force` is set (OutputExistsError)."""
    check_options(recipe=recipe, target_ratio=target_ratio, shard_bytes=shard_bytes)
    out = output_path(out if out is not None else default_pack_path(src))
    say = notice or (lambda msg: print(f"moepack: {msg}", file=sys.stderr))
    with OutputLock(out):
        notices = [m for m in [recover_locked(out), *sweep_stale(out.parent, skip=out.name)] if m]
        for msg in notices:
            say(msg)
        check_output(out, force)  # fail now, not after profiling
        report = _compress(src, out, recipe=recipe, target_ratio=target_ratio, plan=plan, calib=calib, force=force,
                           shard_bytes=shard_bytes, progress=progress, frequencies=frequencies, meta=meta,
                           uniform=uniform, candidates=candidates, profile=profile, rtn=rtn)
    report.notices = notices
    return report


def _compress(src: str, out: Path, *, recipe, target_ratio, plan, calib, force, shard_bytes, progress, frequencies,
              meta, uniform, candidates, profile, rtn) -> CompressReport:
    t0 = time.perf_counter()
    ckpt = Checkpoint(resolve_source(src), name=str(src))
    spec = spec_from_config(ckpt.config)
    adapter = adapter_for(spec)
    layers = list(spec.sparse_layer_ids)
    expert_names = expert_stored_names(adapter, layers, spec.num_experts)
    dense_names = [n for n in ckpt.names() if n not in expert_names]

    src_dtype, src_itemsize, src_format = source_format(ckpt, adapter, layers[0])
    shape = spec.expert_shape()
    alloc: Allocation | None = None
    if plan is None:
        per_proj = None
        if target_ratio is not None and not uniform:
            if profile is None:
                candidates = reachable_candidates(candidates, target_ratio, shape, src_itemsize)
                profile = _profile(src, calib, candidates, progress)
            source_per_expert = 3 * shape[0] * shape[1] * src_itemsize
            alloc = plan_from_profile(profile, target_ratio, shape=shape, source_bytes_per_expert=source_per_expert)
            plan = alloc.plan
            chosen_by = f"profiled per-expert plan for target ratio {target_ratio:g}"
        elif target_ratio is not None:
            name, _ = uniform_for_ratio(target_ratio, shape, src_itemsize)
            per_proj = {p: name for p in PROJECTIONS}
            chosen_by = f"uniform recipe for target ratio {target_ratio:g}"
        elif recipe is not None:
            per_proj = parse_recipe_spec(recipe)
            chosen_by = "recipe"
        else:
            lossless = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[src_dtype]
            per_proj = {p: lossless for p in PROJECTIONS}
            chosen_by = "lossless (source dtype)"
        if per_proj is not None:
            plan = {(layer, e, p): per_proj[p] for layer in layers for e in range(spec.num_experts) for p in PROJECTIONS}
    else:
        chosen_by = "per-expert plan"
    if profile is None and calib is not None:  # profile only the chosen recipes: frequencies, errors, importance
        profile = _profile(src, calib, sorted(set(plan.values())), progress)
    measured = profile.error_table() if profile is not None else None
    if profile is not None and frequencies is None:
        frequencies = profile.frequencies()
    meta = {"generator": f"moepack {__version__}", "recipes_chosen_by": chosen_by,
            "error": ERROR_KIND if profile is not None else WEIGHT_ERROR, **(meta or {})}
    if rtn:
        meta["error"], meta["encoder"] = WEIGHT_ERROR, "round-to-nearest (min/max) baseline"
    if profile is not None:
        meta["calibration"] = profile.summary()
        meta["adaptive"] = profile.adaptive()  # for `auto` big-little / fallback / FloE settings at run time
        meta["channel_order"] = CHANNEL_ORDER
    if alloc is not None:
        meta["plan"] = alloc.summary()

    report = CompressReport(out, str(src), spec.family, 0, 0, 0, 0, target_ratio=target_ratio)
    if alloc is not None:
        report.expected_error, report.planned_ratio = alloc.expected_error, alloc.ratio
    if profile is not None:
        report.profile_seconds, report.calibration_tokens = profile.seconds, profile.tokens
    errors: list[float] = []
    model = {"model_type": ckpt.config.get("model_type"), "family": spec.family, "config": ckpt.config}
    source = {"id": str(src), "expert_bytes": 0, "dense_bytes": 0, "dtype": src_format}
    with PackWriter(out, model=model, source=source, shard_bytes=shard_bytes, overwrite=force,
                    meta=meta) as writer:
        for name, data in sorted(ckpt.aux_files().items()):
            writer.add_file(name, data)
        for i, name in enumerate(dense_names):
            t = ckpt.read(name)
            if profile is not None and spec.expert_bias:
                t = reorder_expert_bias(adapter, spec, name, t, profile)
            writer.add_tensor(name, t)
            report.dense_bytes += t.numel() * t.element_size()
            if progress:
                progress("dense", i + 1, len(dense_names))
        total = len(layers) * spec.num_experts
        for li, layer in enumerate(layers):
            for e in range(spec.num_experts):
                weights = load_expert(ckpt, adapter, layer, e)
                order = profile.experts[(layer, e)].channel_order if profile is not None else None
                if order is not None:  # the same expert, its channels most often selected first
                    weights = {p: w[order] for p, w in weights.items()}
                encoded, errs = {}, {}
                for proj in PROJECTIONS:
                    w = weights[proj]
                    r = parse_recipe(plan[(layer, e, proj)])
                    if rtn:
                        parts = encode_rtn(w, r)
                        errs[proj] = relative_error(w, decode(parts, r, tuple(w.shape)))
                    elif profile is not None:
                        if profile.encoder(layer, e, proj, str(r)) == "rtn":  # RTN measured better here
                            parts = encode_rtn(w, r)
                        else:
                            parts = encode(w, r, importance=profile.importance(layer, e, proj))
                        errs[proj] = math.sqrt(measured[(layer, e, proj)][str(r)])
                    else:
                        parts = encode(w, r)
                        errs[proj] = relative_error(w, decode(parts, r, tuple(w.shape)))
                    encoded[proj] = (str(r), tuple(w.shape), parts)
                    report.recipes[str(r)] += 1
                src_bytes = round(sum(w.numel() for w in weights.values()) * src_itemsize)
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


def reachable_candidates(candidates, target_ratio: float, shape: tuple[int, int], source_itemsize: int):
    """The candidate recipes to profile: the given ones, or the defaults, escalated to the extreme tier when
    the defaults cannot reach the target. CodecError when nothing can."""
    if candidates is not None:
        check_reachable(target_ratio, usable_candidates(candidates, shape), shape, source_itemsize)
        return candidates
    try:
        check_reachable(target_ratio, usable_candidates(DEFAULT_CANDIDATES, shape), shape, source_itemsize)
        return DEFAULT_CANDIDATES
    except CodecError:
        extended = DEFAULT_CANDIDATES + EXTREME_CANDIDATES
        check_reachable(target_ratio, usable_candidates(extended, shape), shape, source_itemsize)
        return extended


def _profile(src: str, calib, candidates, progress: ProgressFn | None) -> Profile:
    from moepack.profile import profile as run_profile

    return run_profile(src, None if calib is None else str(calib), candidates=candidates or DEFAULT_CANDIDATES,
                       progress=progress)
