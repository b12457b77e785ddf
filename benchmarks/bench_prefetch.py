"""Prefetch, cache policies and adaptive execution under expert budgets, against Belady's optimal cache.

    python -m benchmarks.bench_prefetch [--budgets 0.1,0.25,0.5] [--new-tokens 64] [--threads 1]
                                        [--models toy,random] [--only REGEX] [--no-sweep] [--no-write]

For each model (the trained toy model when it is cached, see `python -m moepack.testing.toymodel`; and a
generated Mixtral-layout model with random weights, compressed to q4g32, cached under ~/.cache/moepack/bench)
and each expert budget (a fraction of the expert slots), every technique alone and all together, against
plain LRU on demand, over a session of three prompts: cache hit rate, expert bytes moved per decoded token
(prefetches, streamed misses and partial loads included), prefetch precision/recall, decode tokens/s, and the perplexity change relative to the exact
(unbudgeted) model. Perplexity is teacher-forced token by token through the budgeted cache (the decode path,
so big-little's fallback acts as it does while generating): on held-out text (valid.txt) for the trained
model, on the exact model's own sampled text for the random one. `Belady` is the optimal cache's bytes/token
on the plain run's own routing trace at the same slots (the bound for demand loading of whole experts);
`own Belady` is the bound on that configuration's trace (adaptive modes run fewer experts). A sweep of the
big-little threshold and the FloE keep fraction (no budget: the approximation alone) shows the trade-off
the defaults were chosen from. Writes the `prefetch` section of docs/benchmarks.md."""

from __future__ import annotations

import argparse
import math
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from benchmarks.report import markdown_table, update_section
from moepack.profile.tune import TUNE_KL
from moepack.runtime.adaptive import AdaptiveCalibration
from moepack.runtime.api import MoePackModel
from moepack.runtime.belady import belady, independent_bound, lookahead
from moepack.runtime.executor import FALLBACK_SHARE, PREFETCH_MIN_PROB

CACHE = Path.home() / ".cache" / "moepack"
EVAL_TOKENS = 1024  # perplexity text; on 512 the random model's perplexity change moved by ~1% with KL fixed
CONTEXT = EVAL_TOKENS + 64  # the random model's sampled evaluation text, and prompt + decoded tokens
# cached packs carry the `auto` statistics of the compress that made them: bump when profiling or tuning changes
PACK_TAG = f"cal-kl{TUNE_KL:g}-v3"  # v2: per-expert energies (price on absolute error); v3: channel order
ADAPTIVE_K, SPARSE_KEEP = 0.9, 0.8  # defaults of --adaptive-k / --keep, chosen from the sweep (see `sweep`)


def configs(k: float, keep: float, fallback: float) -> dict[str, dict]:
    """Every technique alone, then all together (`all`: the `auto` thresholds the pack's profile gives), and
    all together with one fixed big-little threshold `k`, FloE keep fraction `keep` and fallback threshold
    `fallback` for every model."""
    every = dict(cache_policy="reuse", bypass=True, prefetch="fate", adaptive_k="auto", fallback="auto",
                 sparse_channels="auto", partial_loads=True)
    alone = {  # each on plain LRU on demand (not the runtime's defaults), so that it is measured by itself
        "LRU on demand (baseline)": dict(),
        "LFU": dict(cache_policy="lfu"),
        "LFU + profiled prior": dict(cache_policy="lfu", cache_prior=True),
        "Fate quotas (policy)": dict(cache_policy="fate"),
        "reuse distance (policy)": dict(cache_policy="reuse"),
        "reuse distance + profiled prior": dict(cache_policy="reuse", cache_prior=True),
        "LRU + bypass": dict(bypass=True),
        "reuse distance + bypass (the runtime's default)": dict(cache_policy="reuse", bypass=True),
        "Fate prefetch": dict(prefetch="fate"),
        "Fate prefetch, ungated": dict(prefetch="fate", prefetch_min_prob=0.0),
        f"big-little {k}, fallback {fallback}": dict(adaptive_k=k, fallback=fallback),
        f"big-little {k}, no fallback": dict(adaptive_k=k, fallback=False),
        "big-little auto, fallback auto": dict(adaptive_k="auto", fallback="auto"),
        f"FloE keep {keep}": dict(sparse_channels=keep),
        f"FloE keep {keep} + partial loads": dict(sparse_channels=keep, partial_loads=True),
        "FloE auto + partial loads": dict(sparse_channels="auto", partial_loads=True),
    }
    return {**{name: dict(PLAIN, **kw) for name, kw in alone.items()},
            "all": every,
            "all but prefetch": {key: v for key, v in every.items() if key != "prefetch"},
            f"all, fixed thresholds ({k} / {fallback} / keep {keep})": dict(every, adaptive_k=k, fallback=fallback,
                                                                            sparse_channels=keep)}


PLAIN = dict(cache_policy="lru", bypass=False)  # the baseline every technique alone is added to
SWEEP_K = (0.6, 0.7, 0.8, 0.9)
SWEEP_KEEP = (0.3, 0.5, 0.7, 0.8, 0.9)
SWEEP_FALLBACK = (0.95, 0.9, 0.8, 0.7, True)  # True: every token may fall back (MoBiLE's rule)


def calibration_file() -> Path:
    """The embedded calibration text as a file: packs are compressed with it, so `auto` has its statistics
    (never the evaluation text)."""
    from moepack.profile import default_calibration_text

    path = CACHE / "bench" / "calib.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        path.write_text(default_calibration_text())
    return path


def random_pack() -> tuple[str, Path, None]:
    name = "prefetch-random-h512-i1024-l8-e16-q4g32"
    out = CACHE / "bench" / f"{name}-{PACK_TAG}.moepack"
    if not out.exists():
        from moepack.compress import compress
        from moepack.testing.checkpoints import make_random_checkpoint

        src = make_random_checkpoint(CACHE / "bench" / name, hidden=512, intermediate=1024, layers=8, experts=16,
                                     top_k=2, vocab=512)
        compress(str(src), out, recipe="q4g32", calib=calibration_file())
    return "random 8 layers x 16 experts top-2, H 512, I 1024, q4g32", out, None


def toy_pack() -> tuple[str, Path, Path] | None:
    """The trained toy model (if cached; never trains here), packed at q4g32."""
    from moepack.testing.toymodel import read_meta, resolve_recipe, toy_model_dir

    src = toy_model_dir(resolve_recipe("small"))
    if read_meta(src) is None:
        return None
    out = CACHE / "bench" / f"prefetch-toy-{src.name}-q4g32-{PACK_TAG}.moepack"
    if not out.exists():
        from moepack.compress import compress

        compress(str(src), out, recipe="q4g32", calib=calibration_file())
    return f"toy trained model {src.name} (4 layers x 8 experts top-2, H 128, I 256), q4g32", out, src


def load(path: Path, slots: int | None, **kw) -> MoePackModel:
    """The pack with no budget (`slots` None) or with exactly `slots` expert slots."""
    if slots is None:
        return MoePackModel.load(path, device="cpu", context=CONTEXT, **kw)
    probe = MoePackModel.load(path, device="cpu", vram="1TB", context=CONTEXT)
    return MoePackModel.load(path, device="cpu", context=CONTEXT, **kw, vram=probe.budget.vram_for(slots))


@torch.inference_mode()
def evaluate(model: MoePackModel, ids: list[int], ref: torch.Tensor | None = None,
             window: int = 256) -> tuple[float, float | None, torch.Tensor]:
    """(perplexity, mean KL(ref || model) per token or None, log-probs [N, V]) of `ids`, teacher-forced token by
    token with a KV cache (the decode path, so big-little's fallback acts as while generating), in independent
    windows of `window` tokens. `ref`: the exact model's log-probs from an earlier call."""
    logps = []
    for i in range(0, len(ids) - 1, window):
        chunk = ids[i:i + window]
        if len(chunk) < 2:
            break
        cache = model.model.new_cache(capacity=len(chunk))
        for t in range(len(chunk) - 1):
            logits = model.model.forward(torch.tensor(chunk[t:t + 1]), cache)[-1].float()
            logps.append(torch.log_softmax(logits, -1))
    logp = torch.stack(logps)  # [N, V]
    targets = torch.tensor([t for i in range(0, len(ids) - 1, window) for t in ids[i + 1:i + window]][:len(logp)])
    ppl = math.exp(-logp.gather(1, targets[:, None]).mean().item())
    kl = None if ref is None else float((ref.exp() * (ref - logp)).sum(1).mean())
    return ppl, kl, logp


PROMPTS = ("To be, or not to be, that is the question: whether 'tis nobler in the mind",
           "Now is the winter of our discontent made glorious summer by this sun of York",
           "Friends, Romans, countrymen, lend me your ears; I come to bury Caesar, not to praise him.")


@dataclass
class Workload:
    """One configuration's decode statistics summed over the prompts (each prompt's Belady and static bounds on
    its own trace, so the ratios are of sums)."""

    steps: int = 0
    decode_s: float = 0.0
    hits: int = 0
    misses: int = 0
    moved: int = 0
    belady: int = 0
    static: int = 0
    predicted: int = 0  # prefetch predictions, their hits, and the experts routed
    predicted_hits: int = 0
    routed: int = 0
    partial_loads: int = 0  # FloE partial reads, their kept rows, and the contiguous runs those rows form
    partial_rows: int = 0
    partial_runs: int = 0
    bound_misses: list = field(default_factory=list)  # per prompt: [MIN misses, best static on a resampled trace]
    ahead: list = field(default_factory=list)  # per prompt: misses of the policy told W tokens ahead, per W

    def add(self, model: MoePackModel, run, bounds: bool) -> None:
        s = run.stats
        self.steps += s.tokens - 1
        self.decode_s += s.decode_s
        self.hits += s.cache_hits
        self.misses += s.cache_misses
        self.moved += s.bytes_moved_decode
        self.belady += s.belady_bytes_decode
        self.static += s.static_bytes_decode
        c = model.executor.counts
        self.partial_loads += c["partial_loads"]
        self.partial_rows += c["partial_rows"]
        self.partial_runs += c["partial_runs"]
        if model.prefetcher is not None:
            score = model.prefetcher.score
            self.predicted, self.predicted_hits = self.predicted + score.predicted, self.predicted_hits + score.hits
            self.routed += score.actual
        if bounds:
            trace, spec, slots, start = model.executor.trace, model.spec, model.executor.cache.slots, model.executor.stats.decode_mark
            opt, static = independent_bound(trace, slots, spec.top_k, start=start)
            self.bound_misses.append([opt.misses, static.misses])
            layers = list(spec.sparse_layer_ids)
            self.ahead.append([lookahead(trace, slots, layers, spec.top_k, w, start=start).misses for w in FORESIGHT]
                              + [belady(trace, slots, start=start).misses])

    def per_step(self, nbytes: int) -> float:
        return nbytes / self.steps

    def layout(self, channels: int) -> str | None:
        """FloE partial reads: kept rows and contiguous runs per part, against the same number of rows at
        random positions (k (1 - (k - 1) / I) runs expected), i.e. channels stored in an arbitrary order."""
        if not self.partial_loads:
            return None
        k, runs = self.partial_rows / self.partial_loads, self.partial_runs / self.partial_loads
        return (f"{self.partial_loads} partial reads of {k:.0f} of {channels} rows per part in {runs:.1f} "
                f"contiguous runs (at random positions: {k * (1 - (k - 1) / channels):.1f})")

    @property
    def independent(self) -> float:
        """Best static over MIN on traces resampled with each prompt's decode frequencies but no memory from
        token to token (belady.independent_bound): how close to MIN an online policy that knew the frequencies
        could get if routing had no memory."""
        return sum(s for _, s in self.bound_misses) / sum(o for o, _ in self.bound_misses)

    def foresight(self) -> list[float]:
        """Misses of the reuse policy told the next W tokens' routing (belady.lookahead) over MIN's, per W."""
        opt = sum(a[-1] for a in self.ahead)
        return [sum(a[i] for a in self.ahead) / opt for i in range(len(FORESIGHT))]


FORESIGHT = (0, 1, 2, 4, 8, 16)  # tokens of exact future routing


def sweep(path: Path, text: list[int], ppl0: float, ref: torch.Tensor, slots: int) -> str:
    """Perplexity change and KL of each approximation alone: big-little and FloE with no budget (so no
    fallback), and the fallback threshold under a budget of `slots` (big-little off, so only fallbacks drop)."""
    rows = []

    def row(name: str, what: str, model: MoePackModel) -> None:
        ppl, kl, _ = evaluate(model, text, ref)
        c = model.executor.counts
        if "{little}" in what:
            what = what.format(little=f"{c['little_tokens'] / max(c['tokens'], 1):.0%}")
        if "{fallback}" in what:
            what = what.format(fallback=f"{c['fallback_tokens'] / max(c['tokens'], 1):.0%}")
        rows.append([name, what, f"{100 * (ppl / ppl0 - 1):+.2f}%", f"{kl:.5f}"])

    for k in SWEEP_K:
        row(f"big-little {k}", "{little} of tokens run half of top-k", load(path, None, adaptive_k=k))
    row("big-little auto", "{little} of tokens run half of top-k", load(path, None, adaptive_k="auto"))
    for keep in SWEEP_KEEP:
        row(f"FloE keep {keep}", f"{keep:.0%} of gate/down channels", load(path, None, sparse_channels=keep))
    auto = load(path, None, sparse_channels="auto")
    row("FloE auto", f"{statistics.mean(auto.executor.sparse_keep.values()):.0%} of gate/down channels", auto)
    for fb in (*SWEEP_FALLBACK, "auto"):
        row(f"fallback {fb}, {slots} slots", "{fallback} of tokens fell back to top-1",
            load(path, slots, adaptive_k=1.0, fallback=fb, **PLAIN))
    return ("Trade-off of each approximation alone (perplexity change and mean KL(exact || approximate) per token "
            "on the same text):\n\n"
            + markdown_table(["setting", "compute", "perplexity change", "KL"], rows) + "\n")


def bench_model(label: str, path: Path, budgets: list[float], new_tokens: int, techniques: dict[str, dict],
                valid: Path | None = None, eval_tokens: int = EVAL_TOKENS, only: str | None = None,
                do_sweep: bool = True) -> str:
    exact = load(path, None)
    prompts = [exact.encode(p)[:24] for p in PROMPTS]
    if valid is not None:  # a trained model: held-out real text
        text = exact.encode(valid.read_text())[:eval_tokens]
        what = f"{len(text)} held-out tokens of {valid.name}"
    else:  # random weights: the exact model's own sampled continuation
        text = prompts[0] + exact.generate(prompts[0], max_new_tokens=eval_tokens - len(prompts[0]), temperature=1.0,
                                           seed=0, stop_at_eos=False).tokens
        what = f"{len(text)} tokens of its own sampled text"
    ppl0, _, ref = evaluate(exact, text)
    n_experts = len(exact.pack.manifest.experts)
    rows, aims, costs, ahead, layouts = [], [], [], [], []
    for frac in budgets:
        slots = max(exact.spec.top_k, round(frac * n_experts))
        plain = decoded = None
        for name, kw in techniques.items():
            if plain is not None and only and not re.search(only, name):
                continue
            t0 = time.perf_counter()
            model = load(path, slots, **kw)
            # every configuration decodes the plain run's texts (teacher-forced), so bytes compare on one workload
            w = Workload()
            texts = []
            for i, prompt in enumerate(prompts):
                run = model.generate(prompt, max_new_tokens=new_tokens, stop_at_eos=False,
                                     forced=decoded[i] if decoded else None)
                w.add(model, run, bounds=plain is None)
                texts.append(run.tokens)
            decoded = decoded or texts
            ppl, kl, _ = evaluate(load(path, slots, **kw), text, ref)
            if plain is None:
                plain = w
                ahead.append([f"{frac:.0%} ({slots} slots)"] + [f"{r:.2f}x" for r in w.foresight()])
            pr = "-" if not w.predicted else f"{w.predicted_hits / w.predicted:.2f} / {w.predicted_hits / w.routed:.2f}"
            ratio = w.moved / plain.belady
            change = 100 * (ppl / ppl0 - 1)
            rows.append([f"{frac:.0%} ({slots} slots)", name, f"{w.hits / (w.hits + w.misses):.1%}",
                         f"{w.per_step(w.moved) / 2**20:.3f}", f"{ratio:.2f}x",
                         f"{w.per_step(w.belady) / 2**20:.3f}", pr, f"{w.steps / w.decode_s:.1f}",
                         f"{change:+.2f}%", f"{kl:.5f}"])
            if name == "all" and w.layout(exact.spec.expert_shape()[0]):
                layouts.append(f"{frac:.0%}: {w.layout(exact.spec.expert_shape()[0])}")
            if name.startswith("all"):
                aims.append(f"{frac:.0%}: {name} moves {ratio:.2f}x the Belady bound of the plain run "
                            f"({w.per_step(w.moved) / 2**20:.3f} vs {plain.per_step(plain.belady) / 2**20:.3f} "
                            f"MiB/token; {'within' if ratio <= 1.5 else 'MISSES'} the 1.5x aim; best static cache "
                            f"{plain.static / plain.belady:.2f}x), perplexity {change:+.2f}%, KL {kl:.5f}")
            if "adaptive_k" in kw or "sparse_channels" in kw:
                costs.append((frac, name, change))
            print(f"  {frac:.0%} {name}: {ratio:.2f}x Belady, ppl {change:+.2f}%, "
                  f"{time.perf_counter() - t0:.1f}s", flush=True)
        rows.append([f"{frac:.0%} ({slots} slots)", "Belady bound (plain trace)", "",
                     f"{plain.per_step(plain.belady) / 2**20:.3f}", "1.00x", "", "", "", "", ""])
        rows.append([f"{frac:.0%} ({slots} slots)", "best static cache, hindsight frequencies (plain trace)", "",
                     f"{plain.per_step(plain.static) / 2**20:.3f}", f"{plain.static / plain.belady:.2f}x", "", "", "",
                     "", ""])
        rows.append([f"{frac:.0%} ({slots} slots)", "best online if routing were independent (A0 / MIN on a "
                     "resampled trace)", "", "", f"{plain.independent:.2f}x", "", "", "", "", ""])
    head = ["budget", "technique", "hit rate", "MiB moved/token", "vs Belady", "own Belady MiB/token",
            "prefetch P / R", "decode tok/s", "perplexity change", "KL"]
    worst = {}
    for frac, name, change in costs:
        if name not in worst or change > worst[name][1]:
            worst[name] = (frac, change)
    cost_lines = [f"{name}: perplexity {change:+.2f}% at worst (at {frac:.0%}); "
                  f"{'under' if change < 2 else 'OVER'} the 2% aim" for name, (frac, change) in worst.items()]
    auto_bl, auto_fb, auto_keep = AdaptiveCalibration.from_pack(exact.pack).auto()
    tune = exact.pack.manifest.meta["adaptive"]
    auto = (f"`auto` on this pack (tuned at compress time on the embedded calibration text, worst-case KL "
            f"{', '.join(f'{kl:.4f} at {sc:g}' for sc, kl in tune['tune_kl'])}): scale {tune['scale']:g}, so "
            f"FloE keeps {statistics.mean(auto_keep.values()):.0%} of channels on average (per expert "
            f"{min(auto_keep.values()):.2g}..{max(auto_keep.values()):.2g}), big-little threshold "
            f"{min(auto_bl.values()):.2f}..{max(auto_bl.values()):.2f}, fallback threshold "
            f"{min(auto_fb.values()):.2f}..{max(auto_fb.values()):.2f} (per layer).")
    body = (f"### {label}\n\n{auto}\n\n{n_experts} experts of {exact.pack.manifest.experts[0].nbytes / 2**20:.3f} MiB; "
            f"{len(prompts)} prompts of {len(prompts[0])} tokens (one session: the cache carries over), {new_tokens} "
            f"decoded after each: the plain run's greedy texts, teacher-forced through every other configuration's "
            f"decode path, so that all of them serve one workload (bytes, hit rates and prefetch figures are over "
            f"the decodes, summed over the prompts; each prompt's bounds on its own trace); perplexity of the exact model on {what}: {ppl0:.3f}; KL = mean KL(exact || this "
            f"configuration) per token on the same text.\n\n"
            + markdown_table(head, rows) + "\n" + "\n".join(f"- {a}" for a in aims + cost_lines) + "\n\n"
            + ("Layout: a profiled pack stores each expert's channels most often selected first, so a token's FloE "
               "subset is mostly a prefix. `all`'s partial reads:\n\n" + "\n".join(f"- {x}" for x in layouts)
               + "\n\n" if layouts else "")
            + "Foresight: misses of the reuse policy told the exact routing of the next W tokens (Belady's MIN "
            "with a horizon of W tokens, moepack.runtime.belady.lookahead), over MIN's, on the plain run's "
            "decode at the same slots, no approximations. W = 1 is a perfect next-layer predictor (every layer "
            "of the current token); W > 1 needs tokens not generated yet, which no decoder has:\n\n"
            + markdown_table(["budget"] + [f"W = {w}" for w in FORESIGHT], ahead) + "\n")
    if do_sweep:
        body += "\n" + sweep(path, text, ppl0, ref, max(exact.spec.top_k, round(0.25 * n_experts)))
    return body


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budgets", default="0.1,0.25,0.5")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--models", default="toy,random", help="comma-separated: toy, random")
    ap.add_argument("--adaptive-k", type=float, default=ADAPTIVE_K, help="big-little threshold")
    ap.add_argument("--keep", type=float, default=SPARSE_KEEP, help="FloE: fraction of channels kept")
    ap.add_argument("--fallback", type=float, default=FALLBACK_SHARE, help="big-little fallback threshold")
    ap.add_argument("--only", default=None, help="regex: run only these techniques (and the baseline)")
    ap.add_argument("--no-sweep", action="store_true", help="skip the threshold / keep-fraction sweep")
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    budgets = [float(b) for b in a.budgets.split(",")]
    wanted = set(a.models.split(","))
    sections = []
    toy = toy_pack() if "toy" in wanted else None
    models = ([toy] if toy else []) + ([random_pack()] if "random" in wanted else [])
    for label, path, src in models:
        print(label, flush=True)
        techniques = configs(a.adaptive_k, a.keep, a.fallback)
        sections.append(bench_model(label, path, budgets, a.new_tokens, techniques,
                                    valid=src / "valid.txt" if src else None,
                                    only=a.only, do_sweep=not a.no_sweep))
    if "toy" in wanted and toy is None:
        sections.insert(0, "_The toy trained model was not cached (run `python -m moepack.testing.toymodel`); only "
                           "the generated model ran._\n")
    body = (f"Expert budget = fraction of expert slots; CPU, {a.threads} thread(s), slot copies from the mapped pack "
            "(on the CPU a prefetch is a synchronous copy, so it adds bytes and cannot hide latency; on CUDA it runs "
            "on the side stream). Bytes moved include prefetches and partial loads. `reuse` evicts the expert whose "
            "next use is expected farthest away (layer-cycle distance + decayed routing frequency), following "
            "whichever of its memories (half-lives of 8-64 tokens) a ghost replay of the cache found to miss least "
            "lately. `bypass`: a miss the policy would not keep over what it would evict streams through and is not "
            "cached (the same bytes, without displacing a more valuable expert). Fate prefetch "
            f"loads a prediction only when its measured hit rate (per layer and rank) is at least {PREFETCH_MIN_PROB} "
            "and the policy admits it over the expert it would evict (under partial loads: only an expert worth "
            "keeping after the predicted use, whose demand miss would otherwise read only its kept rows; "
            f"`ungated`: every top-k prediction). big-little threshold {a.adaptive_k} (share of top-k router weight on the top half; a token "
            f"with a share of at least {a.fallback} whose big expert is missing falls back to the little set), "
            f"FloE keeps {a.keep:.0%} of channels per token by "
            "|up(x)|; with partial loads a resident expert computes from its slot, a miss the policy admits is "
            "cached whole and one it does not admit moves only up and the kept rows of gate/down. `auto`: per-layer "
            "big-little and fallback thresholds and per-expert FloE keep fractions from the pack's profiled "
            "statistics, their error targets scaled per model so that the worst case (every approximation at "
            f"once, every eligible token falling back) stays within {TUNE_KL} nats/token of KL on the calibration text "
            "(moepack/profile/tune.py). `all` = reuse policy + bypass + gated Fate prefetch + big-little auto + "
            "fallback auto + FloE auto with partial loads. `best static cache`: the most used experts of the plain run's "
            "decode pinned (frequencies known in hindsight), every other access a miss: under routing that is "
            "independent from token to token no online policy can expect fewer bytes. `best online if routing were "
            "independent`: the best static cache over Belady's MIN on 4000 tokens resampled with the plain run's "
            "decode frequencies but no memory from token to token (moepack.runtime.belady.independent_bound): "
            "even a policy that knew the frequencies exactly would move this multiple of MIN. `+ profiled prior`: "
            "lfu / reuse starting from the pack's calibration frequencies (`--cache-prior`).\n\n"
            + "\n".join(sections))
    print(body)
    if not a.no_write:
        print(update_section("prefetch", body))


if __name__ == "__main__":
    main()
