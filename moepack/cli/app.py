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
    prompt: str = typer.Option(..., "--prompt", "-p", help="Prompt text."),
    vram: Optional[str] = typer.Option(None, "--vram", help="Memory budget on the device (11GB, 11GiB, 500MB)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", "-n"),
    temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy."),
    top_p: float = typer.Option(1.0, "--top-p"),
    seed: Optional[int] = typer.Option(None, "--seed"),
    context: int = typer.Option(2048, "--context", help="Longest prompt + generation the KV cache is planned for."),
    backend: str = typer.Option("auto", "--backend", help="Kernel backend: auto, torch, cpp, cuda."),
    cache_policy: str = typer.Option("lru", "--cache-policy", help="Expert cache policy."),
    stats: bool = typer.Option(False, "--stats", help="Print run statistics after the text."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object (text and statistics)."),
) -> None:
    """Generate text from a pack with a budgeted expert cache."""
    from moepack.cli import run_cmd

    try:
        run_cmd.run(pack, prompt=prompt, vram=vram, device=device, max_new_tokens=max_new_tokens,
                    temperature=temperature, top_p=top_p, seed=seed, context=context, backend=backend,
                    cache_policy=cache_policy, stats=stats, json_out=json_out)
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
