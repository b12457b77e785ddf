"""`moepack inspect`: the per-expert report, like gguf-dump for GGUF. Reads only the manifest."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

from rich import box
from rich.console import Console
from rich.table import Table

from moepack.format.constants import PROJECTIONS
from moepack.units import format_size


def pack_report(path: Path) -> dict:
    """The inspect report as plain data (also what --json prints)."""
    from moepack.format.validate import read_manifest

    m = read_manifest(path)
    auto_keep, auto = {}, None
    if "adaptive" in m.meta:
        from moepack.runtime.adaptive import AdaptiveCalibration

        cal = AdaptiveCalibration.from_meta(m.meta, path)
        big_little, fallback, auto_keep = cal.auto()
        auto = {"scale": cal.scale, "big_little": big_little, "fallback": fallback}
    experts = []
    weights = 0
    for e in m.experts:
        errs = [p.error for p in e.projections.values() if p.error is not None]
        n = sum(math.prod(p.shape) for p in e.projections.values())
        weights += n
        experts.append({
            "layer": e.layer, "expert": e.expert, "bytes": e.nbytes, "source_bytes": e.source_bytes,
            "ratio": round(e.source_bytes / max(e.nbytes, 1), 4),
            "weights": n, "bits_per_weight": round(8 * e.nbytes / max(n, 1), 4),
            "recipe": {p: e.projections[p].recipe for p in PROJECTIONS},
            "error": {p: e.projections[p].error for p in PROJECTIONS},
            "mean_error": sum(errs) / len(errs) if errs else None,
            "frequency": e.frequency,
            "auto_keep": auto_keep.get(e.key),  # FloE keep fraction of --sparse-channels auto
        })
    source_bytes = sum(e.source_bytes for e in m.experts)
    pack_bytes = sum(e.nbytes for e in m.experts)
    return {
        "path": str(path), "model_type": m.model.get("model_type"), "format_version": m.format_version,
        "source": m.source.get("id"), "source_bytes": source_bytes, "pack_bytes": pack_bytes,
        "ratio": round(source_bytes / max(pack_bytes, 1), 4),
        "bits_per_weight": round(8 * pack_bytes / max(weights, 1), 4), "dense_bytes": sum(t.nbytes for t in m.tensors),
        "pack_total_bytes": sum(s.nbytes for s in m.shards), "shards": len(m.shards), "meta": m.meta,
        "experts": experts, "auto": auto,
    }


def run(name: str, *, json_out: bool, plot: Path | None, experts: bool = False) -> None:
    from moepack.source import resolve_pack

    path = resolve_pack(name)
    rep = pack_report(path)
    if plot is not None:
        from moepack.cli.plots import plot_bits_heatmap

        plot_bits_heatmap(path, plot)
    if json_out:
        print(json.dumps(rep, indent=1))
        return
    console = Console()
    title = f"{path.name}: {rep['model_type']}, {len(rep['experts'])} experts"
    console.print(expert_table(rep, title) if experts else layer_table(rep, title))
    for line in legend(recipe_keys(rep)):
        console.print(line, highlight=False)
    if rep["auto"] is not None and rep["auto"]["big_little"]:
        a = rep["auto"]
        console.print(f"auto (profiled, error targets x{a['scale']:g}): big-little threshold "
                      f"{min(a['big_little'].values()):.2f}..{max(a['big_little'].values()):.2f}, fallback "
                      f"{min(a['fallback'].values()):.2f}..{max(a['fallback'].values()):.2f} per layer",
                      highlight=False)
    console.print(f"experts: {format_size(rep['source_bytes'])} -> {format_size(rep['pack_bytes'])}, "
                  f"[bold]{rep['ratio']:.2f}x[/], {rep['bits_per_weight']:.2f} bits/weight", highlight=False)
    console.print(f"dense {format_size(rep['dense_bytes'])}; on disk {format_size(rep['pack_total_bytes'])} in "
                  f"{rep['shards']} shard(s)", highlight=False)
    console.print("[dim]error: relative output error; freq: share of tokens routed"
                  + ("" if experts else "; per expert: --experts") + "[/]")
    if plot is not None:
        console.print(f"plot: {plot}")


def short_size(n: float) -> str:
    """A size in at most 6 characters: 30.0K, 1.5G."""
    for unit in ("B", "K", "M", "G", "T"):
        if n < 1024 or unit == "T":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    raise AssertionError("unreachable")


RECIPE_WIDTH = 20  # longer labels become keys explained in a legend, so rows fit 80 columns


def recipe_label(recipe: dict) -> str:
    """One recipe when the projections agree, else up/gate/down."""
    names = [recipe[p] for p in PROJECTIONS]
    return names[0] if len(set(names)) == 1 else "/".join(names)


def recipe_keys(rep: dict) -> dict[str, str]:
    """Label -> what the table shows: the label itself, or a key (R1, R2, ...) when some label is too wide."""
    labels = sorted({recipe_label(e["recipe"]) for e in rep["experts"]})
    if all(len(label) <= RECIPE_WIDTH for label in labels):
        return {label: label for label in labels}
    return {label: f"R{i + 1}" for i, label in enumerate(labels)}


def legend(keys: dict[str, str]) -> list[str]:
    """'R1: up/gate/down = ...' lines for the keyed labels."""
    return [f"{key}: up/gate/down = {label}" if "/" in label else f"{key}: {label}"
            for label, key in keys.items() if key != label]


def _num(value, fmt: str) -> str:
    return "" if value is None else format(value, fmt)


def _table(title: str, columns: list[str]) -> Table:
    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False, collapse_padding=True,
                  title_justify="left")
    for col in columns:
        table.add_column(col, justify="left" if col in ("recipe", "recipes") else "right", no_wrap=True)
    return table


def layer_table(rep: dict, title: str) -> Table:
    """One row per sparse layer: its recipes, size, bits per weight, ratio and mean error."""
    keys = recipe_keys(rep)
    table = _table(title, ["layer", "experts", "recipes", "size", "bits/w", "ratio", "error", "freq"])
    by_layer: dict[int, list[dict]] = {}
    for e in rep["experts"]:
        by_layer.setdefault(e["layer"], []).append(e)
    for layer, es in sorted(by_layer.items()):
        recipes = Counter(keys[recipe_label(e["recipe"])] for e in es).most_common()
        label = recipes[0][0] if len(recipes) == 1 else f"{recipes[0][0]} +{len(recipes) - 1} more"
        nbytes, src = sum(e["bytes"] for e in es), sum(e["source_bytes"] for e in es)
        errs = [e["mean_error"] for e in es if e["mean_error"] is not None]
        freqs = [e["frequency"] for e in es if e["frequency"] is not None]
        table.add_row(str(layer), str(len(es)), label, short_size(nbytes),
                      f"{8 * nbytes / max(sum(e['weights'] for e in es), 1):.2f}",
                      f"{src / max(nbytes, 1):.2f}x", _num(sum(errs) / len(errs) if errs else None, ".4f"),
                      f"{min(freqs):.2f}-{max(freqs):.2f}" if freqs else "")
    return table


def expert_table(rep: dict, title: str) -> Table:
    """One row per expert (--experts)."""
    keys = recipe_keys(rep)
    table = _table(title, ["layer", "exp", "recipe", "size", "bits/w", "ratio", "error", "freq", "keep"])
    for e in rep["experts"]:
        table.add_row(str(e["layer"]), str(e["expert"]), keys[recipe_label(e["recipe"])], short_size(e["bytes"]),
                      f"{e['bits_per_weight']:.2f}", f"{e['ratio']:.2f}x", _num(e["mean_error"], ".4f"),
                      _num(e["frequency"], ".3f"), _num(e["auto_keep"], ".2g"))
    return table
