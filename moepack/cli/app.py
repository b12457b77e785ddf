"""The `moepack` command: thin wrappers that parse, call the library, and print."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from moepack.cli import options as _o
from moepack.errors import MoepackError

app = typer.Typer(add_completion=True, no_args_is_help=True, pretty_exceptions_enable=False,
                  context_settings={"help_option_names": ["-h", "--help"]},
                  help="Compress Mixture-of-Experts models per expert and run them in a fraction of the memory.")


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            print(f"moepack {version('moepack')}")
        except PackageNotFoundError:
            print("moepack (not installed as a package)")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", "-V", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """Compress Mixture-of-Experts models per expert and run them in a fraction of the memory."""


def _fail(exc: MoepackError) -> None:
    from rich.console import Console
    from rich.markup import escape

    # one line (the terminal wraps it), the message never read as markup
    Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
    raise typer.Exit(2)


@app.command()
def compress(
    src: str = typer.Argument(..., help="Checkpoint folder, Hugging Face repo id, or alias such as mixtral-8x7b."),
    out: Optional[Path] = typer.Option(None, "-o", "--out", help="Output NAME.moepack (default: the local pack store)."),
    target_ratio: Optional[float] = typer.Option(None, "--target-ratio", help="Source expert bytes / packed expert bytes."),
    recipe: Optional[str] = typer.Option(None, "--recipe", help="One recipe (q4g128, q2g64d, 2:4+q4g64, q2g64+r16, bf16) or up=..,gate=..,down=..; a trailing d stores 8-bit group scales and zeros"),
    calib: Optional[Path] = typer.Option(None, "--calib", help="Calibration text file (profiling)."),
    shard_size: str = typer.Option("2GiB", "--shard-size", help="Largest shard file (at least 8KiB)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing pack (never anything that is not a moepack pack)."),
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
    experts: bool = typer.Option(False, "--experts", help="One row per expert instead of per layer."),
) -> None:
    """Report recipes, sizes, bits per weight, errors and routing per layer or expert (manifest only)."""
    from moepack.cli import inspect_cmd

    try:
        inspect_cmd.run(pack, json_out=json_out, plot=plot, experts=experts)
    except MoepackError as exc:
        _fail(exc)


@app.command()
def run(
    pack: str = typer.Argument(..., help="A pack path, or a model name whose pack is in the store."),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="Prompt text."),
    prompts_file: Optional[Path] = typer.Option(
        None, "--prompts", help="A file with one prompt per line, generated together (several sequences in "
        "flight, their expert loads shared)."),
    max_new_tokens: int = _o.max_new_tokens(128), temperature: float = _o.TEMPERATURE, top_p: float = _o.TOP_P,
    seed: Optional[int] = _o.SEED,
    vram: Optional[str] = _o.VRAM, device: str = _o.DEVICE, context: Optional[int] = _o.CONTEXT,
    dtype: str = _o.DTYPE, backend: str = _o.BACKEND, threads: Optional[int] = _o.THREADS,
    batches: Optional[int] = typer.Option(None, "--batches", help="With --prompts: batches in flight (default 4; "
                                          "see moepack plan).", rich_help_panel=_o.BUDGET),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="With --prompts: sequences per batch "
                                             "(default 1).", rich_help_panel=_o.BUDGET),
    cache_policy: Optional[str] = _o.CACHE_POLICY, bypass: bool = _o.BYPASS, cache_prior: bool = _o.CACHE_PRIOR,
    prefetch: str = _o.PREFETCH, prefetch_min_prob: Optional[float] = _o.PREFETCH_MIN_PROB,
    adaptive_k: str = _o.ADAPTIVE_K, fallback: Optional[str] = _o.FALLBACK,
    sparse_channels: str = _o.SPARSE_CHANNELS, partial_loads: bool = _o.PARTIAL_LOADS,
    stats: bool = typer.Option(False, "--stats", help="Print run statistics and the settings in force.",
                               rich_help_panel=_o.OUTPUT),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object (text, statistics, config).",
                                  rich_help_panel=_o.OUTPUT),
) -> None:
    """Generate text from a pack with a budgeted expert cache."""
    from moepack.cli import run_cmd

    try:
        config, sampling = run_cmd.configure(
            prompt=prompt, prompts_file=prompts_file, batches=batches, batch_size=batch_size,
            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
            **_o.run_options(locals()))
        prompts = run_cmd.read_prompts(prompts_file) if prompts_file is not None else None
        run_cmd.run(pack, config, sampling, prompt=prompt, prompts=prompts, stats=stats, json_out=json_out)
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
    link_gbps: Optional[float] = typer.Option(None, "--link-gbps", help="Link bandwidth into expert slots in GB/s "
                                              "(default: measured)."),
    device_tflops: Optional[float] = typer.Option(None, "--device-tflops", help="Device speed in TFLOPS (default: "
                                                  "a timed expert FFN)."),
    mem_gbps: Optional[float] = typer.Option(None, "--mem-gbps", help="With --device-tflops: device memory "
                                             "bandwidth (GB/s) for reading expert weights."),
    context: Optional[int] = typer.Option(None, "--context", help="Tokens per sequence the KV caches are planned "
                                          "for (as `moepack run --context`)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    backend: str = typer.Option("auto", "--backend", help="Kernels: auto, torch, cpp or cuda."),
    trace_prompts: int = typer.Option(4, "--trace-prompts", help="Prompts run to collect a routing trace when the "
                                      "manifest has no frequencies."),
    batch_size: int = typer.Option(1, "--batch-size", help="Sequences per batch (as `moepack run --batch-size`)."),
    dtype: str = typer.Option("auto", "--dtype", help="Compute dtype the plan is for (as `moepack run --dtype`)."),
    bypass: bool = typer.Option(True, "--bypass/--no-bypass", help="As `moepack run --bypass` (on CUDA it "
                                "reserves a transit slot)."),
    remeasure: bool = typer.Option(False, "--remeasure", help="Measure this machine again instead of using the "
                                   "cached figures."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Choose batches, expert slots and hot experts for --prompts runs; predict tokens/s and where time goes."""
    from moepack.cli import plan_cmd
    from moepack.runtime.config import RunConfig

    try:
        config = RunConfig.build(vram=vram, context=context, device=device, backend=backend, dtype=dtype,
                                 batch_size=batch_size, bypass=bypass)
        if trace_prompts < 0:
            raise MoepackError("--trace-prompts must be 0 or more")
        plan_cmd.run(pack, config, link_gbps=link_gbps, device_tflops=device_tflops, mem_gbps=mem_gbps,
                     trace_count=trace_prompts, json_out=json_out, remeasure=remeasure)
    except MoepackError as exc:
        _fail(exc)


@app.command()
def verify(pack: str = typer.Argument(..., help="A pack path or model name.")) -> None:
    """Check everything `run` relies on: manifest, shards, every checksum, the model's tensors and experts,
    config values, tokenizer and files."""
    from rich.console import Console

    from moepack.format.reader import check_pack
    from moepack.source import resolve_pack

    try:
        r = check_pack(resolve_pack(pack))
        tok = "no tokenizer" if r["tokenizer_tokens"] is None else f"tokenizer of {r['tokenizer_tokens']} tokens"
        Console(highlight=False).print(
            f"[green]ok[/] {r['path']}\n  {r['records']} records, all checksums match\n  {r['family']}: "
            f"{r['layers']} layers, {r['experts']} experts, all present\n  {tok}; {r['files']} files")
    except MoepackError as exc:
        _fail(exc)


@app.command()
def doctor(json_out: bool = typer.Option(False, "--json", help="Print one JSON object.")) -> None:
    """Build the C++ kernels now, check every CPU code path against the reference, report the one in use."""
    from moepack.cli import doctor_cmd

    try:
        code = doctor_cmd.run(json_out=json_out)
    except MoepackError as exc:
        _fail(exc)
    raise typer.Exit(code)


@app.command(name="list")
def list_(json_out: bool = typer.Option(False, "--json", help="Print one JSON object.")) -> None:
    """List the packs in the local pack store."""
    from moepack.cli import store_cmd

    try:
        store_cmd.list_packs(json_out=json_out)
    except MoepackError as exc:
        _fail(exc)


@app.command()
def rm(pack: str = typer.Argument(..., help="A model name in the store, or a pack path."),
       yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask.")) -> None:
    """Remove a pack (only a moepack pack, and not while a compress writes it)."""
    from moepack.cli import store_cmd

    try:
        store_cmd.remove_pack(pack, yes=yes)
    except MoepackError as exc:
        _fail(exc)


@app.command()
def download(name: str = typer.Argument(..., help="An alias such as mixtral-8x7b, or a hub repo id.")) -> None:
    """Download a Hugging Face checkpoint into its cache (where `moepack compress NAME` finds it)."""
    from moepack.cli import store_cmd

    try:
        store_cmd.download(name)
    except MoepackError as exc:
        _fail(exc)


from moepack.cli import serve_cmd as _so  # noqa: E402 - typer only; the web stack loads when serving

SERVE_HELP = (
    "Serve a pack over an OpenAI-compatible HTTP API, with continuous batching.\n\n"
    "Routes: /v1/chat/completions, /v1/completions, /v1/models, /health, /metrics. Memory: --vram bounds the "
    "weights, --max-batch KV caches and the expert slots; beyond it the process needs host memory for its "
    "runtime plus a few bytes per context token of each request in the batch or the queue (connections are "
    "capped, so this does not grow with the load).")
CHAT_HELP = (
    "Chat with a pack in the terminal, through its chat template.\n\n"
    "Answers stream and the history is kept; /reset, /stats, /exit (or Ctrl-D); Ctrl-C stops an answer "
    "without leaving.")


@app.command(help=SERVE_HELP)
def serve(
    pack: str = typer.Argument(..., help="A pack path, or a model name whose pack is in the store."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(8000, "--port", help="TCP port (0: any free port, printed at start)."),
    max_batch: int = typer.Option(4, "--max-batch", help="Requests decoded together (continuous batching); the "
                                  "budget holds this many KV caches of --context tokens."),
    queue_limit: int = typer.Option(16, "--queue-limit", help="Requests that may wait for a place in the batch; "
                                    "more get 429 at once."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="MOEPACK_API_KEY", help="Require "
                                          "'Authorization: Bearer KEY' on /v1 routes."),
    name: Optional[str] = typer.Option(None, "--name", help="Model name in /v1/models (default: the pack's)."),
    vram: Optional[str] = _o.VRAM, device: str = _o.DEVICE, context: Optional[int] = _o.CONTEXT,
    dtype: str = _o.DTYPE, backend: str = _o.BACKEND, threads: Optional[int] = _o.THREADS,
    cache_policy: Optional[str] = _o.CACHE_POLICY, bypass: bool = _o.BYPASS, cache_prior: bool = _o.CACHE_PRIOR,
    prefetch: str = _o.PREFETCH, prefetch_min_prob: Optional[float] = _o.PREFETCH_MIN_PROB,
    adaptive_k: str = _o.ADAPTIVE_K, fallback: Optional[str] = _o.FALLBACK,
    sparse_channels: str = _o.SPARSE_CHANNELS, partial_loads: bool = _o.PARTIAL_LOADS,
) -> None:
    try:
        _so.check_server_options(max_batch=max_batch, queue_limit=queue_limit, port=port, api_key=api_key)
        config = _so.configure(sequences=max_batch, **_o.run_options(locals()))
        _so.run(pack, config, host=host, port=port, max_batch=max_batch, queue_limit=queue_limit, api_key=api_key,
                name=name)
    except MoepackError as exc:
        _fail(exc)


@app.command(help=CHAT_HELP)
def chat(
    pack: str = typer.Argument(..., help="A pack path, or a model name whose pack is in the store."),
    system: Optional[str] = typer.Option(None, "--system", help="A system message for the conversation."),
    max_new_tokens: int = _o.max_new_tokens(256, "Most tokens per answer."), temperature: float = _o.TEMPERATURE,
    top_p: float = _o.TOP_P, seed: Optional[int] = _o.SEED,
    vram: Optional[str] = _o.VRAM, device: str = _o.DEVICE, context: Optional[int] = _o.CONTEXT,
    dtype: str = _o.DTYPE, backend: str = _o.BACKEND, threads: Optional[int] = _o.THREADS,
    cache_policy: Optional[str] = _o.CACHE_POLICY, bypass: bool = _o.BYPASS, cache_prior: bool = _o.CACHE_PRIOR,
    prefetch: str = _o.PREFETCH, prefetch_min_prob: Optional[float] = _o.PREFETCH_MIN_PROB,
    adaptive_k: str = _o.ADAPTIVE_K, fallback: Optional[str] = _o.FALLBACK,
    sparse_channels: str = _o.SPARSE_CHANNELS, partial_loads: bool = _o.PARTIAL_LOADS,
) -> None:
    from moepack.runtime.config import SamplingParams

    try:
        sampling = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
        config = _so.configure(sequences=1, **_o.run_options(locals()))
        from moepack.cli import chat_cmd

        code = chat_cmd.run(pack, config, sampling, system=system)
    except MoepackError as exc:
        _fail(exc)
    raise typer.Exit(code)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
