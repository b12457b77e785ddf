"""Shared plumbing for benchmarks: timing medians, the machine header, and docs/benchmarks.md sections.

Each benchmark owns one section of docs/benchmarks.md, delimited by HTML comments, so benchmarks can be
run alone (`python -m benchmarks.bench_x`) or all together (`just bench`) without clobbering each other."""

from __future__ import annotations

import os
import platform
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
HEADER = "# Benchmarks\n\nNumbers written by `just bench` (each section by its own module under `benchmarks/`).\n"


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    return (f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, GPU: {gpu}; torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, CPU capability {torch.backends.cpu.get_cpu_capability()}")


def median_time(fn: Callable[[], object], *, repeats: int = 5, warmup: int = 1) -> tuple[float, list[float]]:
    """Median wall seconds of `fn()` over `repeats` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def markdown_table(headers: list[str], rows: list[list[object]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out) + "\n"


def update_section(name: str, body: str, *, doc: Path = DOC) -> Path:
    """Replace (or append) the section `name` of docs/benchmarks.md with `body`, stamped with the machine."""
    text = doc.read_text() if doc.exists() else HEADER
    start, end = f"<!-- section:{name} -->", f"<!-- /section:{name} -->"
    stamp = f"_Machine: {machine()}; run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}._\n\n"
    block = f"{start}\n{stamp}{body.strip()}\n{end}"
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)
    return doc
