"""The `moepack` command: thin wrappers that parse, call the library, and print."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from moepack.errors import MoepackError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Compress Mixture-of-Experts models per expert and run them in a fraction of the memory.")


def _fail(exc: MoepackError) -> None:
    from rich.console import Console

    Console(stderr=True).print(f"[bold red]error:[/] {exc}", highlight=False)
    raise typer.Exit(2)


@app.command()
def compress(
    src: str = typer.Argument(..., help="Checkpoint folder, Hugging Face repo id, or alias such as mixtral-8x7b."),
    out: Optional[Path] = typer.Option(None, "-o", "--out", help="Output NAME.moepack (default: the local pack store)."),
    target_ratio: Optional[float] = typer.Option(None, "--target-ratio", help="Source expert bytes / packed expert bytes."),
    recipe: Optional[str] = typer.Option(None, "--recipe", help="One recipe (q4g128, 2:4+q4g64, q2g64+r16, bf16) or up=..,gate=..,down=.."),
    calib: Optional[Path] = typer.Option(None, "--calib", help="Calibration text file (profiling)."),
    shard_size: str = typer.Option("2GiB", "--shard-size", help="Largest shard file."),
    force: bool = typer.Option(False, "--force", help="Replace an existing pack."),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Compress a Hugging Face MoE checkpoint into a .moepack pack."""
    from moepack.cli import compress_cmd

    try:
        compress_cmd.run(src, out, target_ratio=target_ratio, recipe=recipe, calib=calib, shard_size=shard_size,
                         force=force, json_out=json_out)
    except MoepackError as exc:
        _fail(exc)


@app.command()
def inspect(
    pack: str = typer.Argument(..., help="A pack path, or a model name whose pack is in the store."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write a PNG heat map of bits per expert and routing frequency."),
) -> None:
    """Report every expert's recipe, size, error and activation frequency (reads only the manifest)."""
    from moepack.cli import inspect_cmd

    try:
        inspect_cmd.run(pack, json_out=json_out, plot=plot)
    except MoepackError as exc:
        _fail(exc)


@app.command()
def run(
    pack: str = typer.Argument(..., help="A pack path, or a model name whose pack is in the store."),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="Prompt text (or --prompts FILE)."),
    vram: Optional[str] = typer.Option(None, "--vram", help="Memory budget on the device (11GB, 11GiB, 500MB)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", "-n"),
    temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy."),
    top_p: float = typer.Option(1.0, "--top-p"),
    seed: Optional[int] = typer.Option(None, "--seed"),
    context: int = typer.Option(2048, "--context", help="Longest prompt + generation the KV cache is planned for."),
    backend: str = typer.Option("auto", "--backend", help="Kernel backend: auto, torch, cpp, cuda."),
    dtype: str = typer.Option("auto", "--dtype", help="Compute dtype: auto (float32 on the CPU, bfloat16 on CUDA), float32, bfloat16. bfloat16 on the CPU runs many-token products with bf16 GEMMs (faster batches, bf16 rounding)."),
    cache_policy: Optional[str] = typer.Option(None, "--cache-policy", help="Expert cache policy: reuse (the default: evict the expert whose next use is expected farthest away; it adapts how fast it forgets routing to the model), lru (the default in throughput mode), lfu, or fate (per-layer quotas favouring shallow layers)."),
    cache_prior: bool = typer.Option(False, "--cache-prior/--no-cache-prior", help="lfu and reuse start from the pack's profiled routing frequencies (when it has them). Off by default: on the benchmark models a short window of recent routing predicts the next uses better than calibration-wide popularity (docs/benchmarks.md, prefetch)."),
    prefetch: str = typer.Option("none", "--prefetch", help="none, or fate: predict the next layer's experts from this layer's router input and load them early."),
    prefetch_min_prob: float = typer.Option(0.75, "--prefetch-min-prob", help="With --prefetch fate: load a predicted expert only if predictions like it (same layer and rank) have hit at least this often so far; 0 loads every prediction."),
    adaptive_k: str = typer.Option("off", "--adaptive-k", help="off, auto (per layer, from the pack's profiled statistics), or a threshold in (0,1]: tokens whose top half of top-k carries that share of router weight run only that half (big-little)."),
    fallback: str = typer.Option("0.7", "--fallback", help="With --adaptive-k and a budget: off, auto (per layer, profiled), or a share in (0,1]: a token whose top half carries at least this share of its router weight runs only that half when a big expert is not resident (and prefetches it)."),
    sparse_channels: str = typer.Option("off", "--sparse-channels", help="off, auto (per expert, from the pack's profiled selection errors), or the fraction of expert channels kept per token, chosen by |up(x)| (FloE)."),
    partial_loads: bool = typer.Option(False, "--partial-loads", help="With --sparse-channels: a miss the cache policy would not keep moves only up and the kept rows of gate/down (not cached)."),
    bypass: bool = typer.Option(True, "--bypass/--no-bypass", help="A miss the cache policy would not keep over what it would evict streams through without a slot (not cached), so rarely used experts do not displace popular ones (single-sequence runs)."),
    stats: bool = typer.Option(False, "--stats", help="Print run statistics after the text."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object (text and statistics)."),
    prompts_file: Optional[Path] = typer.Option(None, "--prompts", help="Throughput mode: a file with one prompt per line."),
    batches: int = typer.Option(4, "--batches", help="Throughput mode: batches in flight (see `moepack plan`)."),
    batch_size: int = typer.Option(1, "--batch-size", help="Throughput mode: sequences per batch (batches x batch size in flight)."),
) -> None:
    """Generate text from a pack with a budgeted expert cache."""
    from moepack.cli import run_cmd

    try:
        if prompts_file is not None:  # throughput mode: moepack/cli/throughput_cmd.py
            from moepack.cli import throughput_cmd

            throughput_cmd.run(pack, prompts_file=prompts_file, batches=batches, batch_size=batch_size, vram=vram,
                               device=device, dtype=dtype,
                               max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                               context=context, backend=backend, cache_policy=cache_policy or "lru", stats=stats,
                               json_out=json_out)
            return
        if prompt is None:
            raise MoepackError("give --prompt TEXT, or --prompts FILE for throughput mode")
        run_cmd.run(pack, prompt=prompt, vram=vram, device=device, max_new_tokens=max_new_tokens,
                    temperature=temperature, top_p=top_p, seed=seed, context=context, backend=backend, dtype=dtype,
                    cache_policy=cache_policy or "reuse", stats=stats, json_out=json_out, prefetch=prefetch,
                    adaptive_k=adaptive_k,
                    prefetch_min_prob=prefetch_min_prob, fallback=fallback, sparse_channels=sparse_channels,
                    partial_loads=partial_loads, bypass=bypass, cache_prior=cache_prior)
    except MoepackError as exc:
        _fail(exc)


@app.command(name="eval")
def eval_(
    pack: str = typer.Argument(..., help="A pack path, or a model name whose pack is in the store."),
    text: Path = typer.Option(..., "--text", help="Text file to measure perplexity on (held-out text)."),
    reference: Optional[str] = typer.Option(None, "--reference", help="The uncompressed checkpoint: adds its perplexity and KL(reference || pack)."),
    context: int = typer.Option(512, "--context", help="Tokens per non-overlapping window."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="Use only the first N tokens of the text."),
    backend: str = typer.Option("auto", "--backend", help="Kernel backend: auto, torch, cpp."),
    decoded: bool = typer.Option(False, "--decoded", help="Decode every expert once (reference decoder) instead of streaming: faster for small models."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object (perplexity, reference_perplexity, kl, tokens, ...)."),
) -> None:
    """Perplexity of a pack on a text, and KL divergence to the uncompressed model."""
    from moepack.cli import eval_cmd

    try:
        eval_cmd.run(pack, text=text, reference=reference, context=context, max_tokens=max_tokens, backend=backend,
                     json_out=json_out, decoded=decoded)
    except MoepackError as exc:
        _fail(exc)


@app.command()
def plan(
    pack: str = typer.Argument(..., help="A pack path, or a model name whose pack is in the store."),
    vram: str = typer.Option(..., "--vram", help="Memory budget on the device (11GB, 11GiB, 500MB)."),
    link_gbps: Optional[float] = typer.Option(None, "--link-gbps", help="Link bandwidth into expert slots in GB/s (default: measured)."),
    device_tflops: Optional[float] = typer.Option(None, "--device-tflops", help="Device speed in TFLOPS (default: a timed expert FFN)."),
    mem_gbps: Optional[float] = typer.Option(None, "--mem-gbps", help="With --device-tflops: device memory bandwidth (GB/s) for reading expert weights."),
    context: int = typer.Option(2048, "--context", help="Tokens per sequence the KV caches are planned for."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    backend: str = typer.Option("auto", "--backend", help="Kernel backend: auto, torch, cpp, cuda."),
    trace_prompts: int = typer.Option(4, "--trace-prompts", help="Prompts run to collect a routing trace when the manifest has no frequencies."),
    batch_size: int = typer.Option(1, "--batch-size", help="Sequences per batch (as `moepack run --batch-size`)."),
    dtype: str = typer.Option("auto", "--dtype", help="Compute dtype the plan is for (as `moepack run --dtype`)."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Choose batches, expert slots and hot experts for throughput mode; predict tokens/s and where time goes."""
    from moepack.cli import plan_cmd

    try:
        plan_cmd.run(pack, vram=vram, link_gbps=link_gbps, device_tflops=device_tflops, mem_gbps=mem_gbps,
                     context=context, device=device, backend=backend, trace_count=trace_prompts, json_out=json_out,
                     batch_size=batch_size, dtype=dtype)
    except MoepackError as exc:
        _fail(exc)


@app.command()
def verify(pack: str = typer.Argument(..., help="A pack path or model name.")) -> None:
    """Validate a pack and check every checksum."""
    from rich.console import Console

    from moepack.format import Pack
    from moepack.source import resolve_pack

    try:
        path = resolve_pack(pack)
        with Pack(path, verify=True) as p:
            n = len(p.manifest.experts) + len(p.manifest.tensors)
        Console().print(f"[green]ok[/] {path}: {n} records, all checksums match")
    except MoepackError as exc:
        _fail(exc)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
