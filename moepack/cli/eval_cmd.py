"""`moepack eval`: perplexity of a pack on a text, and KL to the uncompressed reference."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table


def run(pack: str, *, text: Path, reference: str | None, context: int, max_tokens: int | None, backend: str,
        json_out: bool, decoded: bool = False) -> None:
    from moepack.evaluate import evaluate, read_text

    console = Console(stderr=True)
    body = read_text(text)
    columns = (TextColumn("{task.description:<8}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as bar:
        tasks: dict[str, int] = {}

        def progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done)

        res = evaluate(pack, body, reference=reference, context=context, max_tokens=max_tokens, backend=backend,
                       decoded=decoded, progress=progress)
    if json_out:
        out = res.to_dict()
        out["text"] = str(text)
        print(json.dumps(out, indent=1))
        return
    table = Table(title="moepack eval", show_header=False)
    table.add_row("pack", res.pack)
    table.add_row("text", f"{text}: {res.tokens} predicted tokens in {res.windows} window(s) of <= {res.context}")
    table.add_row("perplexity", f"[bold]{res.perplexity:.4f}[/]")
    if res.reference is not None:
        delta = 100 * (res.perplexity / res.reference_perplexity - 1)
        table.add_row("reference", res.reference)
        table.add_row("reference perplexity", f"{res.reference_perplexity:.4f} (pack {delta:+.2f}%)")
        table.add_row("KL(ref || pack)", f"{res.kl:.5f} nats/token")
    table.add_row("time", f"{res.seconds:.1f} s")
    Console().print(table)
