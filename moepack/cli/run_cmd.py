"""`moepack run`: stream generated text to the terminal; --stats / --json for the numbers.

Options become one `RunConfig` and one `SamplingParams` before anything is loaded, so a bad value is
refused at once. One prompt (`--prompt`) or many (`--prompts FILE`) go through the same engine."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from moepack.errors import ConfigError, MoepackError
from moepack.units import format_size


def configure(*, prompt: str | None, prompts_file: Path | None, batches: int | None, batch_size: int | None,
              max_new_tokens: int, temperature: float, top_p: float, seed: int | None, **options):
    """(RunConfig, SamplingParams) from the CLI's options, or ConfigError naming the option."""
    from moepack.runtime.config import RunConfig, SamplingParams

    if (prompt is None) == (prompts_file is None):
        raise ConfigError("give either --prompt TEXT or --prompts FILE")
    if prompt is not None:
        check_text(prompt, "--prompt")
        for flag, value in (("--batches", batches), ("--batch-size", batch_size)):
            if value is not None:
                raise ConfigError(f"{flag} needs --prompts FILE (one --prompt is one sequence)")
    else:
        batches = 4 if batches is None else batches
    sampling = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    return RunConfig.build(batches=batches, batch_size=batch_size, **options), sampling


def check_text(text: str, what: str) -> None:
    """Refuse text that cannot be encoded (undecodable bytes on the command line arrive as surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigError(f"{what} is not valid UTF-8 text") from None
    if not text.strip():
        raise ConfigError(f"{what} is empty")


def read_prompts(path: Path) -> list[str]:
    """Non-empty lines of a UTF-8 file."""
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except OSError as exc:
        raise MoepackError(f"cannot read the prompts file: {exc.strerror or exc}", path=path) from None
    except UnicodeDecodeError as exc:
        raise MoepackError(f"the prompts file is not UTF-8 text (byte {exc.start})", path=path) from None
    prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise MoepackError("the prompts file has no non-empty line", path=path)
    return prompts


def run(pack: str, config, sampling, *, prompt: str | None, prompts: list[str] | None, stats: bool,
        json_out: bool) -> None:
    from moepack.runtime.api import MoePackModel
    from moepack.source import resolve_pack

    err = Console(stderr=True)
    with err.status("loading pack", spinner="dots"):
        model = MoePackModel.load(resolve_pack(pack), config)
    if model.budget is not None and not json_out:
        err.print(f"[dim]budget: {model.budget.describe()}[/]", highlight=False)
    if prompts is not None:
        from moepack.cli import throughput_cmd

        throughput_cmd.run(model, prompts, sampling, stats=stats, json_out=json_out)
        return
    started = False

    def show(text: str) -> None:
        nonlocal started
        if not started:
            sys.stdout.write(prompt)  # echoed once the prompt is accepted, so an error never follows it
            started = True
        sys.stdout.write(text)
        sys.stdout.flush()

    try:
        result = model.generate(prompt, max_new_tokens=sampling.max_new_tokens, temperature=sampling.temperature,
                                top_p=sampling.top_p, seed=sampling.seed,
                                on_text=None if json_out else show)
    except MoepackError:
        if started:
            sys.stdout.write("\n")  # the error starts on its own line
            sys.stdout.flush()
        raise
    if json_out:
        print(json.dumps({"text": result.text, "interrupted": result.interrupted, **result.stats.to_json(),
                          "config": config.to_json()}, indent=1))
    else:
        show("\n")
        if result.interrupted:
            err.print("[yellow]interrupted[/]")
        if stats:
            print_stats(err, result.stats, config)
    if result.interrupted:
        raise typer.Exit(130)


def print_stats(console: Console, s, config=None) -> None:
    t = Table(title="run statistics", show_header=False)
    t.add_row("tokens", f"{s.tokens} generated after {s.prompt_tokens} prompt tokens")
    t.add_row("time to first token", f"{s.ttft_s * 1000:.1f} ms")
    t.add_row("decode", f"{s.decode_tokens_per_s:.2f} tokens/s")
    if s.expert_slots is None:
        t.add_row("expert slots", "all (no budget: used in place)")
    else:
        t.add_row("expert slots", f"{s.expert_slots}/{s.total_experts}")
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
    host = getattr(s, "host_overhead_s_per_layer", None)
    if host is not None:
        t.add_row("host overhead", f"{host * 1e6:.0f} us per layer per token")
    t.add_row("peak RSS", format_size(s.peak_rss_bytes))
    if s.peak_device_bytes is not None:
        t.add_row("peak device memory", format_size(s.peak_device_bytes))
    for key, value in s.extra.items():
        t.add_row(EXTRA_LABELS.get(key, key.replace("_", " ")), _fmt_extra(key, value))
    t.add_row("device / kernels", f"{s.device} / {s.backend}")
    if config is not None:
        for label, value in config.describe():
            t.add_row(label, value)
    console.print(t)


EXTRA_LABELS = {
    "decode_path": "one-token decode",
    "prefetch_used": "prefetched experts used",
    "prefetch_wasted": "prefetched experts unused",
    "little_token_share": "tokens run on the little half",
    "fallback_token_share": "tokens that fell back",
    "channels_computed": "expert channels computed",
    "streamed": "misses streamed past the cache",
    "partial_loads": "partial loads",
    "partial_bytes_saved": "bytes saved by partial loads",
    "partial_runs_per_load": "contiguous reads per partial load",
}


def _fmt_extra(key: str, value) -> str:
    if key.endswith("_share") or key == "channels_computed":
        return f"{value:.1%}"
    if key.endswith("bytes_saved"):
        return format_size(value)
    return f"{value:.3g}" if isinstance(value, float) else str(value)
