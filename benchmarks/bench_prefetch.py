"""Prefetch, cache policies and adaptive execution under expert budgets, against Belady's optimal cache.

    python -m benchmarks.bench_prefetch [--budgets 0.1,0.25,0.5] [--new-tokens 24] [--threads 1] [--no-write]

For each model (the toy trained model when it is cached under ~/.cache/moepack/toy-model, and a generated
Mixtral-layout model compressed to q4g32, cached under ~/.cache/moepack/bench) and each expert budget (a
fraction of the expert slots), every technique alone and all together, against plain LRU on demand:
cache hit rate, expert bytes moved per decoded token, prefetch precision/recall, decode tokens/s, and the
perplexity change of teacher-forced text relative to the exact (unbudgeted) model. `Belady` is the optimal
cache's bytes/token on the plain run's own routing trace at the same slots (the bound for demand loading);
`own Belady` is the bound on that configuration's trace (adaptive modes run fewer experts). Writes the
`prefetch` section of docs/benchmarks.md."""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from benchmarks.report import markdown_table, update_section
from moepack.runtime.api import MoePackModel

CACHE = Path.home() / ".cache" / "moepack"
ADAPTIVE_K, SPARSE_KEEP = 0.9, 0.8
CONFIGS = {
    "LRU on demand (baseline)": dict(),
    "LFU": dict(cache_policy="lfu"),
    "Fate quotas (policy)": dict(cache_policy="fate"),
    "Fate prefetch": dict(prefetch="fate"),
    f"big-little {ADAPTIVE_K}": dict(adaptive_k=ADAPTIVE_K),
    f"big-little {ADAPTIVE_K}, no fallback": dict(adaptive_k=ADAPTIVE_K, fallback=False),
    f"FloE keep {SPARSE_KEEP}": dict(sparse_channels=SPARSE_KEEP),
    f"FloE keep {SPARSE_KEEP} + partial loads": dict(sparse_channels=SPARSE_KEEP, partial_loads=True),
    "all (fate quotas+prefetch+big-little+FloE)": dict(cache_policy="fate", prefetch="fate", adaptive_k=ADAPTIVE_K,
                                                      sparse_channels=SPARSE_KEEP),
    "all + partial loads": dict(cache_policy="fate", prefetch="fate", adaptive_k=ADAPTIVE_K,
                                sparse_channels=SPARSE_KEEP, partial_loads=True),
    "all but prefetch": dict(cache_policy="fate", adaptive_k=ADAPTIVE_K, sparse_channels=SPARSE_KEEP),
}


def random_pack() -> tuple[str, Path]:
    name = "prefetch-random-h512-i1024-l8-e16-q4g32"
    out = CACHE / "bench" / f"{name}.moepack"
    if not out.exists():
        from moepack.compress import compress
        from moepack.testing.checkpoints import make_random_checkpoint

        src = make_random_checkpoint(CACHE / "bench" / name, hidden=512, intermediate=1024, layers=8, experts=16,
                                     top_k=2, vocab=512)
        compress(str(src), out, recipe="q4g32")
    return "random 8 layers x 16 experts top-2, H 512, I 1024, q4g32", out


def toy_pack() -> tuple[str, Path] | None:
    src = CACHE / "toy-model"
    cfg = next(iter(sorted(src.rglob("config.json"))), None) if src.exists() else None
    if cfg is None:
        return None
    out = CACHE / "bench" / "prefetch-toy-q4g32.moepack"
    if not out.exists():
        from moepack.compress import compress

        compress(str(cfg.parent), out, recipe="q4g32")
    return "toy trained model, q4g32", out


def load(path: Path, slots: int | None, **kw) -> MoePackModel:
    if slots is None:
        return MoePackModel.load(path, device="cpu", context=256)
    probe = MoePackModel.load(path, device="cpu", vram="1TB", context=256)
    b = probe.budget
    return MoePackModel.load(path, device="cpu", context=256, **kw,
                             vram=b.dense_bytes + b.kv_bytes + b.workspace_bytes + slots * b.slot_bytes)


def perplexity(model: MoePackModel, ids: list[int]) -> float:
    logits = model.logits(ids)[:-1]
    nll = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]))
    return math.exp(nll.item())


def bench_model(label: str, path: Path, budgets: list[float], new_tokens: int) -> str:
    exact = load(path, None)
    prompt = exact.encode("To be, or not to be, that is the question: whether 'tis nobler in the mind")[:24]
    # evaluation text: the exact model's own sampled continuation (meaningful for random models too)
    text = prompt + exact.generate(prompt, max_new_tokens=96, temperature=1.0, seed=0, stop_at_eos=False).tokens
    ppl0 = perplexity(exact, text)
    n_experts = len(exact.pack.manifest.experts)
    rows = []
    aims = []
    for frac in budgets:
        slots = max(exact.spec.top_k, round(frac * n_experts))
        bound = None
        for name, kw in CONFIGS.items():
            t0 = time.perf_counter()
            model = load(path, slots, **kw)
            s = model.generate(prompt, max_new_tokens=new_tokens, stop_at_eos=False).stats
            ppl = perplexity(load(path, slots, **kw), text)
            if bound is None:
                bound = s.belady_bytes_per_token
            pr = "-" if s.prefetch_precision is None else f"{s.prefetch_precision:.2f} / {s.prefetch_recall:.2f}"
            ratio = s.bytes_moved_per_token / bound if bound else float("nan")
            rows.append([f"{frac:.0%} ({slots} slots)", name, f"{s.cache_hit_rate:.1%}",
                         f"{s.bytes_moved_per_token / 2**20:.2f}", f"{ratio:.2f}x",
                         f"{s.belady_bytes_per_token / 2**20:.2f}", pr, f"{s.decode_tokens_per_s:.1f}",
                         f"{100 * (ppl / ppl0 - 1):+.2f}%"])
            if name.startswith("all"):
                aims.append(f"{frac:.0%}: {name.split(' (')[0]} moves {ratio:.2f}x the Belady bound of the plain run "
                            f"({s.bytes_moved_per_token / 2**20:.2f} vs {bound / 2**20:.2f} MiB/token)")
            print(f"  {frac:.0%} {name}: {time.perf_counter() - t0:.1f}s", flush=True)
        rows.append([f"{frac:.0%} ({slots} slots)", "Belady bound (plain trace)", "", f"{bound / 2**20:.2f}", "1.00x",
                     "", "", "", ""])
    head = ["budget", "technique", "hit rate", "MiB moved/token", "vs Belady", "own Belady MiB/token",
            "prefetch P / R", "decode tok/s", "perplexity change"]
    return (f"### {label}\n\n{n_experts} experts of {exact.pack.manifest.experts[0].nbytes / 2**20:.2f} MiB; "
            f"prompt {len(prompt)} tokens, {new_tokens} decoded; perplexity of the exact model on "
            f"{len(text)} tokens of its own sampled text: {ppl0:.3f}.\n\n"
            + markdown_table(head, rows) + "\n" + "\n".join(f"- {a}" for a in aims) + "\n")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budgets", default="0.1,0.25,0.5")
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    budgets = [float(b) for b in a.budgets.split(",")]
    sections = []
    toy = toy_pack()
    models = ([toy] if toy else []) + [random_pack()]
    for label, path in models:
        print(label, flush=True)
        sections.append(bench_model(label, path, budgets, a.new_tokens))
    if toy is None:
        sections.insert(0, "_The toy trained model was not cached (~/.cache/moepack/toy-model); only the generated "
                           "model ran._\n")
    body = (f"Expert budget = fraction of expert slots; CPU, {a.threads} thread(s), slot copies from the mapped pack "
            "(on the CPU a prefetch is a synchronous copy, so it adds bytes and cannot hide latency; on CUDA it runs "
            "on the side stream). Bytes moved include prefetches and partial loads. big-little threshold "
            f"{ADAPTIVE_K} (share of top-k router weight on the top half), FloE keeps {SPARSE_KEEP:.0%} of channels "
            "per token by |up(x)|; partial loads move up plus the kept rows of gate/down on a miss and cache nothing.\n\n"
            + "\n".join(sections))
    print(body)
    if not a.no_write:
        print(update_section("prefetch", body))


if __name__ == "__main__":
    main()
