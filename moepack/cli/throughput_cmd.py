"""`moepack run PACK --prompts FILE --batches N [--batch-size B]`: generate for every line of FILE with N
batches of B sequences in flight."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from moepack.errors import MoepackError


def read_prompts(path: Path) -> list[str]:
    try:
        lines = [line.rstrip("\n") for line in Path(path).read_text().splitlines()]
    except OSError as exc:
        raise MoepackError(f"cannot read the prompts file: {exc}", path=path) from None
    prompts = [line for line in lines if line.strip()]
    if not prompts:
        raise MoepackError("the prompts file has no non-empty line", path=path)
    return prompts


def run(pack: str, *, prompts_file: Path, batches: int, batch_size: int = 1, vram, device, max_new_tokens,
        temperature, top_p, seed, context, backend, cache_policy, stats: bool, json_out: bool,
        dtype: str = "auto") -> None:
    from moepack.runtime.throughput import generate_many, load_for_throughput
    from moepack.source import resolve_pack

    prompts = read_prompts(prompts_file)
    err = Console(stderr=True)
    with err.status("loading pack", spinner="dots"):
        model = load_for_throughput(resolve_pack(pack), vram=vram, batches=batches, batch_size=batch_size,
                                    device=device, backend=backend, cache_policy=cache_policy, context=context,
                                    dtype=dtype)
    if model.budget is not None and not json_out:
        err.print(f"[dim]budget ({batches} batches of {batch_size}): {model.budget.describe()}[/]", highlight=False)
    # next-layer prefetch pays where a copy engine overlaps compute (CUDA); CPU copies share the compute cores
    prefetch = model.model.device.type == "cuda"
    result = generate_many(model, prompts, batches=batches, batch_size=batch_size, max_new_tokens=max_new_tokens,
                           temperature=temperature, top_p=top_p, seed=seed, prefetch=prefetch)
    if json_out:
        print(json.dumps({"results": [{"prompt": prompts[r.index], "text": r.text, "tokens": r.tokens,
                                       "latency_s": r.latency_s, "ttft_s": r.ttft_s} for r in result.results],
                          **result.stats.to_json()}, indent=1))
        return
    for r in result.results:
        print(f"{prompts[r.index]}{r.text}")
    if stats:
        print_stats(err, result.stats)


def print_stats(console: Console, s) -> None:
    t = Table(title="throughput statistics", show_header=False)
    t.add_row("prompts / batches", f"{s.prompts} prompts, {s.batches} batches of {s.batch_size} in flight")
    t.add_row("generated", f"{s.generated_tokens} tokens in {s.wall_s:.2f} s = {s.tokens_per_s:.2f} tokens/s")
    t.add_row("latency per prompt", f"mean {s.mean_latency_s:.2f} s, max {max(s.latencies_s):.2f} s")
    t.add_row("expert loads", f"{s.loads} ({s.loads_per_layer_step:.2f} per layer step), {s.bytes_moved / 1e6:.1f} MB")
    t.add_row("stall", f"{s.stall_s:.2f} s ({s.stall_fraction:.1%} of the run)")
    t.add_row("prefetch", f"{s.prefetch_used}/{s.prefetch_issued} used")
    t.add_row("expert slots", f"{s.expert_slots} ({s.hot_experts} hot)")
    console.print(t)
