"""`moepack compress`: progress while encoding, a summary table at the end."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from moepack.errors import ConfigError, MoepackError
from moepack.units import format_size, parse_size


def run(src: str, out: Path | None, *, target_ratio, recipe, calib, shard_size: str, force: bool, json_out: bool) -> None:
    from moepack.compress import check_options, compress

    try:
        shard_bytes = parse_size(shard_size)
    except MoepackError as exc:
        raise ConfigError(f"--shard-size: {exc}") from None
    check_options(recipe=recipe, target_ratio=target_ratio, shard_bytes=shard_bytes)  # before any loading
    console = Console(stderr=json_out)
    columns = (TextColumn("{task.description:<8}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False, disable=not console.is_terminal and json_out) as bar:
        tasks: dict[str, int] = {}

        def progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done)

        def notice(msg: str) -> None:
            console.print(f"[yellow]note:[/] {msg}", highlight=False)

        report = compress(src, out, recipe=recipe, target_ratio=target_ratio, calib=calib, force=force,
                          shard_bytes=shard_bytes, progress=progress, notice=notice)
    summary = {
        "path": str(report.path), "source": report.source, "model_type": report.model_type,
        "source_bytes": report.source_expert_bytes, "pack_bytes": report.pack_expert_bytes,
        "ratio": round(report.ratio, 4), "target_ratio": report.target_ratio, "dense_bytes": report.dense_bytes,
        "experts": report.num_experts, "recipes": dict(report.recipes), "mean_relative_error": report.mean_error,
        "seconds": round(report.seconds, 2), "notices": report.notices,
    }
    if report.expected_error is not None:  # a profiled plan: what the planner expected, and the calibration
        summary.update(planned_ratio=round(report.planned_ratio, 4), expected_error=report.expected_error,
                       calibration_tokens=report.calibration_tokens,
                       profile_seconds=round(report.profile_seconds or 0.0, 2))
    if json_out:
        print(json.dumps(summary, indent=1))
        return
    table = Table(title="moepack compress", show_header=False)
    table.add_row("pack", str(report.path))
    table.add_row("model", f"{report.source} ({report.model_type}), {report.num_experts} experts")
    table.add_row("recipes", ", ".join(f"{r} x{n}" for r, n in report.recipes.most_common()))
    table.add_row("experts", f"{format_size(report.source_expert_bytes)} -> {format_size(report.pack_expert_bytes)}")
    target = f" (target {report.target_ratio:g})" if report.target_ratio else ""
    table.add_row("ratio", f"[bold]{report.ratio:.2f}x[/]{target}")
    table.add_row("dense", f"{format_size(report.dense_bytes)} (passthrough)")
    table.add_row("mean rel. error", f"{report.mean_error:.4f}")
    if report.expected_error is not None:
        table.add_row("expected error", f"{report.expected_error:.5f} (frequency-weighted rel. squared output error "
                                        f"per layer; {report.calibration_tokens} calibration tokens, "
                                        f"profiled in {report.profile_seconds:.1f} s)")
    table.add_row("time", f"{report.seconds:.1f} s")
    console.print(table)
    console.print(f"wrote {report.path}", soft_wrap=True, highlight=False)  # whole, never cut: scripts read it
