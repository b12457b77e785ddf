"""Run every benchmark module; each writes its own section of docs/benchmarks.md.

    python -m benchmarks.run_all [--quick] [--only NAME[,NAME...]] [--skip NAME[,NAME...]]

Modules, in order: kernels (benchmarks/bench_kernels.py, via bench_runtime.write_kernels), runtime,
runtime-families (benchmarks/bench_runtime_families.py), compress-memory, prefetch
(benchmarks/bench_prefetch.py), throughput (benchmarks/bench_throughput.py), peers, quality
(benchmarks/quality.py). A module whose file does not exist yet is reported and skipped; a module that fails does not stop the others, and
run_all exits non-zero at the end if any failed. `--quick` passes `--quick` to every module whose source
mentions that flag (the others run with their defaults)."""

from __future__ import annotations

import argparse
import importlib
import inspect
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _kernels(quick: bool) -> None:
    from benchmarks.bench_runtime import write_kernels

    write_kernels(quick)


def _module_main(module: str) -> Callable[[bool], None]:
    def run(quick: bool) -> None:
        mod = importlib.import_module(f"benchmarks.{module}")
        main = mod.main
        takes_quick = "--quick" in (HERE / f"{module}.py").read_text()
        argv = ["--quick"] if quick and takes_quick else []
        params = inspect.signature(main).parameters
        if params:  # main(argv=None) style
            rc = main(argv)
            if isinstance(rc, int) and rc != 0:
                raise RuntimeError(f"benchmarks/{module}.py main() returned {rc}")
        else:  # main() parses sys.argv itself
            saved = sys.argv
            sys.argv = [f"benchmarks/{module}.py", *argv]
            try:
                main()
            finally:
                sys.argv = saved

    return run


# name -> (file that must exist, runner)
MODULES: dict[str, tuple[str, Callable[[bool], None]]] = {
    "kernels": ("bench_kernels.py", _kernels),
    "runtime": ("bench_runtime.py", _module_main("bench_runtime")),
    "runtime-families": ("bench_runtime_families.py", _module_main("bench_runtime_families")),
    "compress-memory": ("bench_compress_memory.py", _module_main("bench_compress_memory")),
    "prefetch": ("bench_prefetch.py", _module_main("bench_prefetch")),
    "throughput": ("bench_throughput.py", _module_main("bench_throughput")),
    "peers": ("bench_peers.py", _module_main("bench_peers")),
    "quality": ("quality.py", _module_main("quality")),
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller settings in every module that has them")
    ap.add_argument("--only", default=None, help=f"comma-separated subset of: {', '.join(MODULES)}")
    ap.add_argument("--skip", default="", help="comma-separated modules to leave out")
    a = ap.parse_args(argv)
    names = [n.strip() for n in a.only.split(",")] if a.only else list(MODULES)
    names = [n for n in names if n not in {s.strip() for s in a.skip.split(",") if s.strip()}]
    unknown = [n for n in names if n not in MODULES]
    if unknown:
        ap.error(f"unknown module(s) {', '.join(unknown)}; choose from {', '.join(MODULES)}")
    summary = []
    for name in names:
        fname, run = MODULES[name]
        if not (HERE / fname).exists():
            summary.append((name, "skipped", 0.0, f"benchmarks/{fname} does not exist"))
            print(f"== {name}: skipped (benchmarks/{fname} does not exist)", flush=True)
            continue
        print(f"== {name}", flush=True)
        t0 = time.perf_counter()
        try:
            run(a.quick)
            summary.append((name, "ok", time.perf_counter() - t0, ""))
        except SystemExit as exc:  # argparse or an explicit exit inside a module
            status = "ok" if exc.code in (None, 0) else "failed"
            summary.append((name, status, time.perf_counter() - t0, f"exit {exc.code}"))
        except Exception as exc:  # noqa: BLE001 - one module's failure must not stop the others
            traceback.print_exc()
            summary.append((name, "failed", time.perf_counter() - t0, f"{type(exc).__name__}: {exc}"))
    print("\n== summary")
    for name, status, secs, why in summary:
        print(f"{name:16s} {status:8s} {secs:7.0f} s  {why}")
    return 1 if any(s == "failed" for _, s, _, _ in summary) else 0


if __name__ == "__main__":
    sys.exit(main())
