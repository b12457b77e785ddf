"""Many prompts in one run (`moepack run PACK --prompts FILE`): every line of FILE generated with the
config's batches of sequences in flight, their expert loads shared."""

from __future__ import annotations

import json

import typer
from rich.console import Console
from rich.table import Table


def run(model, prompts: list[str], sampling, *, stats: bool, json_out: bool) -> None:
    from moepack.runtime.throughput import generate_many

    config = model.config
    result = generate_many(model, prompts, batches=config.batches, batch_size=config.batch_size,
                           max_new_tokens=sampling.max_new_tokens, temperature=sampling.temperature,
                           top_p=sampling.top_p, seed=sampling.seed)
    if json_out:
        print(json.dumps({"results": [{"prompt": prompts[r.index], "text": r.text, "tokens": r.tokens,
                                       "latency_s": r.latency_s, "ttft_s": r.ttft_s} for r in result.results],
                          **result.stats.to_json(), "config": config.to_json()}, indent=1))
    else:
        for r in result.results:
            print(f"{prompts[r.index]}{r.text}")
        if stats:
            print_stats(Console(stderr=True), result.stats, config)
    if getattr(result, "interrupted", False):
        raise typer.Exit(130)


def print_stats(console: Console, s, config=None) -> None:
    t = Table(title="throughput statistics", show_header=False)
    t.add_row("prompts / batches", f"{s.prompts} prompts, {s.batches} batches of {s.batch_size} in flight")
    t.add_row("generated", f"{s.generated_tokens} tokens in {s.wall_s:.2f} s = {s.tokens_per_s:.2f} tokens/s")
    t.add_row("latency per prompt", f"mean {s.mean_latency_s:.2f} s, max {max(s.latencies_s):.2f} s")
    t.add_row("expert loads", f"{s.loads} ({s.loads_per_layer_step:.2f} per layer step), {s.bytes_moved / 1e6:.1f} MB")
    t.add_row("stall", f"{s.stall_s:.2f} s ({s.stall_fraction:.1%} of the run)")
    t.add_row("prefetch", f"{s.prefetch_used}/{s.prefetch_issued} used")
    t.add_row("expert slots", f"{s.expert_slots} ({s.hot_experts} hot)")
    if config is not None:
        for label, value in config.describe():
            t.add_row(label, value)
    console.print(t)
