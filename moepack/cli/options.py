"""The run options as typer options, declared once for `run`, `serve` and `chat` (each becomes a field of
one `RunConfig`, runtime/config.py, which validates it), with the help panels they are grouped in."""

from __future__ import annotations

import typer

BUDGET = "Budget and device"
CACHE = "Cache and prefetch"
APPROX = "Approximations"
SAMPLING = "Sampling"
OUTPUT = "Output"

VRAM = typer.Option(None, "--vram", help="Memory budget on the device (11GB, 11GiB, 500MB) for dense weights, "
                    "KV caches, workspace and expert slots; default: no bound.", rich_help_panel=BUDGET)
DEVICE = typer.Option("auto", "--device", help="auto, cpu or cuda.", rich_help_panel=BUDGET)
CONTEXT = typer.Option(None, "--context", help="Tokens per sequence (prompt + answer) the KV caches are planned "
                       "for (default 2048, at most the model's positions).", rich_help_panel=BUDGET)
DTYPE = typer.Option("auto", "--dtype", help="Compute dtype: auto (float32 on the CPU, bfloat16 on CUDA), "
                     "float32 or bfloat16.", rich_help_panel=BUDGET)
BACKEND = typer.Option("auto", "--backend", help="Kernels: auto, torch, cpp or cuda.", rich_help_panel=BUDGET)
THREADS = typer.Option(None, "--threads", help="CPU threads (default: torch's).", rich_help_panel=BUDGET)
CACHE_POLICY = typer.Option(None, "--cache-policy", help="reuse (default), lru, lfu or fate.",
                            rich_help_panel=CACHE)
BYPASS = typer.Option(True, "--bypass/--no-bypass", help="A miss the policy would not keep streams through "
                      "without taking a slot (default on).", rich_help_panel=CACHE)
CACHE_PRIOR = typer.Option(False, "--cache-prior/--no-cache-prior", help="lfu and reuse start from the pack's "
                           "profiled routing frequencies.", rich_help_panel=CACHE)
PREFETCH = typer.Option("none", "--prefetch", help="none, or fate: load the next layer's predicted experts "
                        "early.", rich_help_panel=CACHE)
PREFETCH_MIN_PROB = typer.Option(None, "--prefetch-min-prob", help="With --prefetch fate: load a prediction "
                                 "only if predictions like it have hit this often (default 0.75).",
                                 rich_help_panel=CACHE)
ADAPTIVE_K = typer.Option("off", "--adaptive-k", help="Big-little: off, auto (profiled), or a share in (0,1].",
                          rich_help_panel=APPROX)
FALLBACK = typer.Option(None, "--fallback", help="With --adaptive-k: off, auto, or a share in (0,1] "
                        "(default 0.7).", rich_help_panel=APPROX)
SPARSE_CHANNELS = typer.Option("off", "--sparse-channels", help="FloE: off, auto (profiled), or the share of "
                               "expert channels kept per token.", rich_help_panel=APPROX)
PARTIAL_LOADS = typer.Option(False, "--partial-loads", help="With --sparse-channels: a miss reads only the kept "
                             "rows.", rich_help_panel=APPROX)

TEMPERATURE = typer.Option(0.0, "--temperature", help="0 is greedy.", rich_help_panel=SAMPLING)
TOP_P = typer.Option(1.0, "--top-p", help="Nucleus sampling mass, in (0, 1].", rich_help_panel=SAMPLING)
SEED = typer.Option(None, "--seed", help="Seed of the sampler.", rich_help_panel=SAMPLING)


def max_new_tokens(default: int, what: str = "Tokens to generate per prompt."):
    return typer.Option(default, "--max-new-tokens", "-n", help=what, rich_help_panel=SAMPLING)


RUN_OPTIONS = ("vram", "device", "context", "dtype", "backend", "threads", "cache_policy", "bypass", "cache_prior",
               "prefetch", "prefetch_min_prob", "adaptive_k", "fallback", "sparse_channels", "partial_loads")


def run_options(values: dict) -> dict:
    """The shared run options among a command's parameters (its `locals()`), named as RunConfig's fields."""
    return {name: values[name] for name in RUN_OPTIONS}
