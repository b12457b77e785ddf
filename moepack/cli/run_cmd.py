"""`moepack run`: stream generated text to the terminal; --stats / --json for the numbers."""

from __future__ import annotations

import json
import sys

from rich.console import Console
from rich.table import Table

from moepack.units import format_size


def run(pack: str, *, prompt: str, vram, device, max_new_tokens, temperature, top_p, seed, context, backend,
        cache_policy, stats: bool, json_out: bool, **options) -> None:
    from moepack.runtime.api import MoePackModel
    from moepack.source import resolve_pack

    err = Console(stderr=True)
    with err.status("loading pack", spinner="dots"):
        model = MoePackModel.load(resolve_pack(pack), vram=vram, device=device, backend=backend,
                                  cache_policy=cache_policy, context=context, **options)
    if model.budget is not None and not json_out:
        err.print(f"[dim]budget: {model.budget.describe()}[/]", highlight=False)

    def show(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    if not json_out:
        show(prompt)
    result = model.generate(prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                            on_text=None if json_out else show)
    if json_out:
        print(json.dumps({"text": result.text, "interrupted": result.interrupted, **result.stats.to_json()}, indent=1))
        return
    show("\n")
    if result.interrupted:
        err.print("[yellow]interrupted[/]")
    if stats:
        print_stats(err, result.stats)


def print_stats(console: Console, s) -> None:
    t = Table(title="run statistics", show_header=False)
    t.add_row("tokens", f"{s.tokens} generated after {s.prompt_tokens} prompt tokens")
    t.add_row("time to first token", f"{s.ttft_s * 1000:.1f} ms")
    t.add_row("decode", f"{s.decode_tokens_per_s:.2f} tokens/s")
    slots = "all (no budget)" if s.expert_slots is None else f"{s.expert_slots}/{s.total_experts}"
    t.add_row("expert slots", slots)
    t.add_row("cache hit rate", f"{s.cache_hit_rate:.1%} ({s.cache_hits} hits, {s.cache_misses} misses)")
    t.add_row("bytes moved / token", format_size(s.bytes_moved_per_token))
    if s.belady_bytes_per_token is not None:
        t.add_row("optimal (Belady) bytes / token", f"{format_size(s.belady_bytes_per_token)} "
                  f"(hit rate {s.belady_hit_rate:.1%} at {s.expert_slots} slots)")
    if s.static_bytes_per_token is not None:
        t.add_row("best static cache bytes / token", f"{format_size(s.static_bytes_per_token)} "
                  "(the most used experts pinned, known in hindsight)")
    if s.prefetch != "none":
        p, r = s.prefetch_precision, s.prefetch_recall
        pr = "no predictions" if p is None else f"precision {p:.1%}, recall {r:.1%}"
        t.add_row(f"prefetch ({s.prefetch})", f"{pr}; {format_size(s.prefetch_bytes)} prefetched")
    t.add_row("expert calls", str(s.expert_calls))
    t.add_row("stall", f"{s.stall_s * 1000:.1f} ms")
    t.add_row("peak RSS", format_size(s.peak_rss_bytes))
    if s.peak_device_bytes is not None:
        t.add_row("peak device memory", format_size(s.peak_device_bytes))
    for k, v in s.extra.items():
        t.add_row(k, f"{v:.4g}" if isinstance(v, float) else str(v))
    t.add_row("device / kernels", f"{s.device} / {s.backend}")
    console.print(t)
