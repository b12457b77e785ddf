"""`moepack inspect`: the per-expert report, like gguf-dump for GGUF. Reads only the manifest."""

from __future__ import annotations

import json
from pathlib import Path

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
    for e in m.experts:
        errs = [p.error for p in e.projections.values() if p.error is not None]
        experts.append({
            "layer": e.layer, "expert": e.expert, "bytes": e.nbytes, "source_bytes": e.source_bytes,
            "ratio": round(e.source_bytes / max(e.nbytes, 1), 4),
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
        "ratio": round(source_bytes / max(pack_bytes, 1), 4), "dense_bytes": sum(t.nbytes for t in m.tensors),
        "pack_total_bytes": sum(s.nbytes for s in m.shards), "shards": len(m.shards), "meta": m.meta,
        "experts": experts, "auto": auto,
    }


def run(name: str, *, json_out: bool, plot: Path | None) -> None:
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
    table = Table(title=f"{path.name}: {rep['model_type']}, {len(rep['experts'])} experts", show_lines=False)
    for col in ("layer", "expert", "up", "gate", "down", "bytes", "ratio", "rel. error", "freq", "auto keep"):
        table.add_column(col, justify="right" if col not in ("up", "gate", "down") else "left")
    for e in rep["experts"]:
        err = "" if e["mean_error"] is None else f"{e['mean_error']:.4f}"
        freq = "" if e["frequency"] is None else f"{e['frequency']:.3f}"
        keep = "" if e["auto_keep"] is None else f"{e['auto_keep']:.2g}"
        table.add_row(str(e["layer"]), str(e["expert"]), e["recipe"]["up"], e["recipe"]["gate"], e["recipe"]["down"],
                      format_size(e["bytes"]), f"{e['ratio']:.2f}x", err, freq, keep)
    console.print(table)
    if rep["auto"] is not None and rep["auto"]["big_little"]:
        a = rep["auto"]
        console.print(f"auto (profiled, error targets x{a['scale']:g}): big-little threshold "
                      f"{min(a['big_little'].values()):.2f}..{max(a['big_little'].values()):.2f}, fallback "
                      f"{min(a['fallback'].values()):.2f}..{max(a['fallback'].values()):.2f} per layer; "
                      "FloE keep per expert in the table", highlight=False)
    console.print(f"experts: {format_size(rep['source_bytes'])} -> {format_size(rep['pack_bytes'])}, "
                  f"[bold]{rep['ratio']:.2f}x[/]; dense {format_size(rep['dense_bytes'])}; "
                  f"on disk {format_size(rep['pack_total_bytes'])} in {rep['shards']} shard(s)")
    if plot is not None:
        console.print(f"plot: {plot}")
