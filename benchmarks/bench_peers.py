"""moepack against its peers on one model, one prompt, one memory budget, in one run (issue 6).

    python -m benchmarks.bench_peers [--quick] [--model auto|toy|random] [--repeats 5] [--new-tokens 32]
                                     [--threads 1] [--no-llama] [--wide yes|no|only] [--wide-divisor 1]

Systems, each in its own process (so its peak RSS is its own), all on the same checkpoint and token ids:
  * moepack: the INT4 pack (q4g128) whole and at the budget, the lossless bf16 pack at the budget, and a
    2-bit pack (q2g64) whole, to compare with llama.cpp's Q2_K at about the same bytes on disk;
  * transformers, whole model in memory (bfloat16, the checkpoint's dtype);
  * transformers + accelerate offloading at the budget: device_map="auto", max_memory={"cpu": budget},
    an offload folder (the layers that do not fit are read back from disk at every forward);
  * llama.cpp through llama-cpp-python: GGUF f16 from the vendored convert_hf_to_gguf.py, then Q4_K_M and
    Q2_K through llama_cpp.llama_model_quantize(); everything on the CPU (n_gpu_layers=0), mmap as default.
The budget is what the moepack runtime needs for the lossless pack with 25% of its experts resident (dense
weights upcast to float32, KV cache for the context, workspace, expert slots).

Figures: time to first token for a fixed prompt, decode tokens/s (greedy, exactly N tokens), peak RSS, bytes of
weights on disk, perplexity on held-out text (non-overlapping windows, logits from each system; llama.cpp
through logits_all). Medians over `--repeats` runs after a warm-up; ratios are against moepack's INT4 pack
measured in the same run. Writes the "peers" section of docs/benchmarks.md and docs/img/peers_*.png.

First in the section, at Mixtral-8x7B's real expert widths (a generated 2-layer checkpoint, 5.6 GB of bf16
experts): moepack against llama.cpp pair by pair at 1 and 2 threads with a 512-token prompt
(benchmarks/peers/wide.py), and the summary lines that scripts read. `--wide only` measures just that and
keeps the other tables of the last run; `--wide-divisor 4` runs it at a quarter of the widths (fast)."""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import time
from pathlib import Path

from benchmarks.peers import gguf
from benchmarks.peers.common import (
    BENCH_DIR,
    PROMPT,
    ROOT,
    ModelConfig,
    checkpoint,
    fmt_bytes,
    held_out_text,
    log,
    pack,
    run_worker,
    token_ids,
    toy_mixtral,
    weight_bytes,
)
from benchmarks.peers.wide import PAIRS, measure_wide, merge_pairs, render_wide
from benchmarks.peers.worker import moepack_budget
from benchmarks.report import DOC, markdown_table, update_section

IMG = ROOT / "docs" / "img"
RANDOM = ModelConfig(hidden=1024, intermediate=1536, layers=4, experts=16)
REF = "moepack q4g128, whole"


def random_model() -> tuple[Path, str]:
    cfg = RANDOM
    return checkpoint(cfg), (f"a generated Mixtral layout with random weights (hidden {cfg.hidden}, expert "
                             f"intermediate {cfg.intermediate}, {cfg.layers} layers x {cfg.experts} experts, top-2, "
                             f"vocab {cfg.vocab}, bf16)")


def toy_model() -> tuple[Path, str] | None:
    toy = toy_mixtral()
    if toy is None:
        return None
    cfg = json.loads((toy / "config.json").read_text())
    return toy, (f"the trained toy Mixtral `{toy.name}` (Shakespeare; hidden {cfg['hidden_size']}, expert "
                 f"intermediate {cfg['intermediate_size']}, {cfg['num_hidden_layers']} layers x "
                 f"{cfg['num_local_experts']} experts, vocab {cfg['vocab_size']}, {cfg.get('dtype', '?')})")


def systems(ck: Path, budget: int, *, llama: bool, notes: list[str]) -> list[tuple[str, dict, Path]]:
    """(label, job, weights path) for every system that could be prepared; failures go to `notes`."""
    packs = {r: pack(ck, r) for r in ("q4g128", "bf16", "q2g64")}
    offload = BENCH_DIR / f"{ck.name}.offload"
    shutil.rmtree(offload, ignore_errors=True)
    out = [
        (REF, {"system": "moepack", "path": str(packs["q4g128"])}, packs["q4g128"]),
        ("moepack q4g128, at the budget", {"system": "moepack", "path": str(packs["q4g128"]), "vram": budget},
         packs["q4g128"]),
        ("moepack bf16, at the budget", {"system": "moepack", "path": str(packs["bf16"]), "vram": budget},
         packs["bf16"]),
        ("moepack q2g64, whole", {"system": "moepack", "path": str(packs["q2g64"])}, packs["q2g64"]),
        ("transformers bf16, whole", {"system": "transformers", "path": str(ck), "dtype": "bfloat16"}, ck),
        ("transformers + accelerate offload, at the budget",
         {"system": "accelerate", "path": str(ck), "dtype": "bfloat16", "max_memory_bytes": budget,
          "offload_dir": str(offload)}, ck),
    ]
    if not llama:
        notes.append("llama.cpp was skipped (--no-llama).")
        return out
    why = gguf.ensure_llama_cpp()
    if why is not None:
        notes.append(f"llama.cpp rows are missing: {why}")
        return out
    try:
        f16 = gguf.convert(ck, "f16")
    except RuntimeError as exc:
        notes.append(f"llama.cpp rows are missing: GGUF conversion failed: {exc}")
        return out
    out.append(("llama.cpp f16", {"system": "llamacpp", "path": str(f16)}, f16))
    for q in ("Q4_K_M", "Q2_K"):
        try:
            path = gguf.quantize(f16, q)
        except Exception as exc:  # noqa: BLE001 - reported in the section
            notes.append(f"llama.cpp {q}: quantisation failed: {exc}")
            continue
        out.append((f"llama.cpp {q}", {"system": "llamacpp", "path": str(path)}, path))
    return out


def measure(ck: Path, desc: str, *, repeats: int, new_tokens: int, threads: int, ppl_tokens: int, window: int,
            llama: bool) -> dict:
    notes: list[str] = []
    prompt = token_ids(ck, PROMPT)
    ppl_ids = token_ids(ck, held_out_text(ck))[:ppl_tokens + 1]
    context = 512
    bf16_pack = pack(ck, "bf16")
    budget = moepack_budget(str(bf16_pack), 0.25, context)
    base = {"prompt_ids": prompt, "ppl_ids": ppl_ids, "ppl_window": window, "repeats": repeats,
            "new_tokens": new_tokens, "threads": threads, "context": context}
    results = []
    load0 = os.getloadavg()[0]
    for label, job, weights in systems(ck, budget, llama=llama, notes=notes):
        log(f"peers: {label}")
        r = run_worker({**base, **job, "label": label}, timeout=1200)
        r["weights_bytes"] = weight_bytes(weights)
        if "error" in r:
            log(f"  failed: {r['error']}")
        else:
            log(f"  ttft {r['ttft_s'] * 1e3:.0f} ms, decode {r['decode_tps']:.2f} tok/s, "
                f"rss {fmt_bytes(r['peak_rss_bytes'])}, ppl {r.get('ppl', float('nan')):.3f}")
        results.append(r)
    return {"ck": str(ck), "desc": desc, "budget": budget, "results": results, "notes": notes,
            "load": (load0, os.getloadavg()[0]),
            "prompt_tokens": len(prompt), "ppl_tokens": len(ppl_ids) - 1, "window": window, "repeats": repeats,
            "new_tokens": new_tokens, "threads": threads}


def plots(m: dict, prefix: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    ok = [r for r in m["results"] if "error" not in r]
    colors = {"moepack": "tab:blue", "transformers": "tab:orange", "accelerate": "tab:red", "llamacpp": "tab:green"}
    IMG.mkdir(parents=True, exist_ok=True)
    paths = []
    for key, ylabel, fname in (("decode_tps", "decode tokens/s (median)", f"{prefix}_tps_vs_bytes.png"),
                               ("ppl", "perplexity on held-out text", f"{prefix}_ppl_vs_bytes.png")):
        fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=110)
        points: dict[tuple, list] = {}  # systems at the same point (same weights, same perplexity) share a label
        for r in ok:
            if r.get(key) is not None:
                x, y = r["weights_bytes"] / 1e6, r[key]
                points.setdefault((round(x, 2), round(y, 3)), [x, y, r["system"], []])[3].append(
                    r["label"].replace(", at the budget", " @budget"))
        for i, (x, y, system, labels) in enumerate(sorted(points.values())):
            ax.scatter([x], [y], color=colors.get(system, "k"), s=40)
            ax.annotate("\n".join(labels), (x, y), fontsize=7, xytext=(5, 4 if i % 2 else -10),
                        textcoords="offset points")
        ax.set_xscale("log")
        plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
        ax.xaxis.set_major_formatter(plain)
        ax.xaxis.set_minor_formatter(plain)
        ax.tick_params(axis="x", which="minor", labelsize=7)
        ax.set_xlabel("weights on disk (MB, log scale)")
        ax.set_ylabel(ylabel)
        model = "trained toy model" if "toy" in m["desc"] else "random-weight model"
        ax.set_title(f"{ylabel} vs bytes on disk ({model}, {m['threads']} thread(s))", fontsize=10)
        ax.grid(alpha=0.3)
        fig.savefig(IMG / fname, bbox_inches="tight")
        plt.close(fig)
        paths.append(IMG / fname)
    return paths


def render(m: dict, images: list[Path]) -> str:
    res = m["results"]
    ref = next((r for r in res if r.get("label") == REF and "error" not in r), None)
    headers = ["system", "weights on disk", "peak RSS", "TTFT ms", "decode tok/s", "decode vs moepack q4",
               "perplexity", "ppl vs moepack q4", "notes"]
    rows = []
    for r in res:
        if "error" in r:
            rows.append([r.get("label"), fmt_bytes(r.get("weights_bytes")), "-", "-", "-", "-", "-", "-",
                         f"failed: {r['error'][:100]}"])
            continue
        note = ""
        if r.get("expert_slots") is not None:
            note = (f"{r['expert_slots']}/{r['total_experts']} expert slots, hit rate {r['cache_hit_rate']:.0%}, "
                    f"{fmt_bytes(r['bytes_moved_per_token'])} moved/token")
        elif r.get("placement"):
            note = "modules: " + ", ".join(f"{k} {v}" for k, v in sorted(r["placement"].items()))
        ppl = r.get("ppl")
        rows.append([r["label"], fmt_bytes(r["weights_bytes"]), fmt_bytes(r["peak_rss_bytes"]),
                     f"{r['ttft_s'] * 1e3:.0f}", f"{r['decode_tps']:.2f}",
                     f"{r['decode_tps'] / ref['decode_tps']:.2f}x" if ref else "-",
                     f"{ppl:.3f}" if ppl is not None else "-",
                     f"{ppl / ref['ppl']:.4f}" if ref and ppl is not None and ref.get("ppl") else "-", note])

    def find(label_part: str) -> dict | None:
        return next((r for r in res if label_part in (r.get("label") or "") and "error" not in r), None)

    verdicts = []
    acc, mq, mb = find("accelerate"), find("moepack q4g128, at the budget"), find("moepack bf16, at the budget")
    if acc and mb and mq:
        verdicts.append(
            f"- Equal memory ({fmt_bytes(m['budget'])} budget): transformers + accelerate offloading decodes "
            f"{acc['decode_tps']:.2f} tok/s; moepack decodes {mb['decode_tps']:.2f} tok/s with the lossless pack "
            f"({mb['decode_tps'] / acc['decode_tps']:.2f}x) and {mq['decode_tps']:.2f} tok/s with the INT4 pack "
            f"({mq['decode_tps'] / acc['decode_tps']:.2f}x). Peak RSS: accelerate {fmt_bytes(acc['peak_rss_bytes'])}, "
            f"moepack {fmt_bytes(mb['peak_rss_bytes'])} / {fmt_bytes(mq['peak_rss_bytes'])}.")
    q2, lq2 = find("moepack q2g64"), find("llama.cpp Q2_K")
    if q2 and lq2 and q2.get("ppl") and lq2.get("ppl"):
        sizes = (f"moepack q2g64 ({fmt_bytes(q2['weights_bytes'])}) and llama.cpp Q2_K "
                 f"({fmt_bytes(lq2['weights_bytes'])})")
        if "random weights" in m["desc"]:
            # a random model has no "better" perplexity: what counts is how far each moves from the lossless one
            lossless = find("transformers bf16, whole") or find("llama.cpp f16")
            if lossless and lossless.get("ppl"):
                d_q2, d_l = (abs(math.log(r["ppl"] / lossless["ppl"])) for r in (q2, lq2))
                closer = "moepack q2g64" if d_q2 < d_l else "llama.cpp Q2_K"
                verdicts.append(
                    f"- About equal bytes, {sizes}: perplexity {q2['ppl']:.3f} and {lq2['ppl']:.3f} against "
                    f"{lossless['ppl']:.3f} lossless, i.e. {d_q2:.1%} and {d_l:.1%} away in log-perplexity: "
                    f"{closer} stays closer to the lossless model (random weights: this is distortion, not quality).")
        else:
            better = "lower (better)" if q2["ppl"] < lq2["ppl"] else "higher (worse)"
            verdicts.append(f"- About equal bytes, {sizes}: moepack's perplexity {q2['ppl']:.3f} is {better} than "
                            f"llama.cpp Q2_K's {lq2['ppl']:.3f}.")
    tr, lf = find("transformers bf16, whole"), find("llama.cpp f16")
    if ref and tr:
        verdicts.append(f"- Whole in memory: moepack INT4 decodes {ref['decode_tps']:.2f} tok/s, transformers bf16 "
                        f"{tr['decode_tps']:.2f}" + (f", llama.cpp f16 {lf['decode_tps']:.2f}" if lf else "")
                        + (f", llama.cpp Q4_K_M {find('Q4_K_M')['decode_tps']:.2f}" if find("Q4_K_M") else "")
                        + " tok/s.")
    text = [
        f"Model: {m['desc']}. All systems: {m['threads']} thread(s), prompt {m['prompt_tokens']} token ids (the same "
        f"ids for every system, from the checkpoint's tokenizer), {m['new_tokens']} new tokens greedy, medians over "
        f"{m['repeats']} runs after one warm-up, each system in its own process. Memory budget "
        f"{fmt_bytes(m['budget'])}: what moepack needs for the lossless pack with 25% of its experts resident. "
        f"Perplexity over {m['ppl_tokens']} held-out tokens in windows of {m['window']}. Weights on disk: "
        f"safetensors shards, the whole pack folder, or the GGUF file. Peak RSS includes each runtime's "
        f"interpreter and libraries (torch ~0.3 GB; llama.cpp's process has no torch) and mapped file pages. "
        f"The two cores were shared with other work (1-minute load average {m['load'][0]:.1f} at the start, "
        f"{m['load'][1]:.1f} at the end): absolute speeds are low and noisy; compare rows of one table.",
        "",
        markdown_table(headers, rows),
        "\n".join(verdicts),
    ]
    if "random weights" in m["desc"]:
        text.append("\nWith random weights, perplexity is near the vocabulary size for every system; the ratios "
                    "against the lossless systems only measure how far each quantisation moves the logits.")
    if m["notes"]:
        text.append("\n" + "\n".join(f"- {n}" for n in m["notes"]))
    text.append("\n" + "  ".join(f"![{p.stem}](img/{p.name})" for p in images))
    return "\n".join(text)


def kept_tables() -> str:
    """The smaller models' tables of the peers section as docs/benchmarks.md has them (for a run that measures
    only the Mixtral-width pairs on a machine without the last run's peers.json), under their own machine line."""
    text = DOC.read_text() if DOC.exists() else ""
    m = re.search(r"<!-- section:peers -->\n(_Machine: [^\n]*_)\n(.*?)<!-- /section:peers -->", text, re.S)
    if not m:
        return ""
    stamp, body = m.group(1), m.group(2)
    if "### Smaller models" in body:
        body = body.split("### Smaller models", 1)[1]
        stamp = re.search(r"_Smaller models: (.*?)_\n", body)
        stamp = stamp.group(0).strip() if stamp else ""
        body = re.sub(r"_Smaller models: .*?_\n", "", body)
    else:
        stamp = "_Smaller models: measured in an earlier run, " + stamp.strip("_").removeprefix("Machine: ").rstrip(".") + "._"
    body = re.sub(r"\n_Module wall time [^\n]*_\n?", "\n", body).strip()
    return "### Smaller models\n\n" + stamp + "\n\n" + body.removeprefix("\n")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="16 new tokens, 256 perplexity tokens")
    ap.add_argument("--model", default="random", choices=("random", "toy"),
                    help="model of the main table (default: the generated random model, large enough to time)")
    ap.add_argument("--toy", default="auto", choices=("auto", "no", "only"),
                    help="auto: a second table (perplexity on real text) on the trained toy model if it is cached; "
                         "only: measure just the toy model and keep the main table of the last run")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ppl-tokens", type=int, default=None)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--no-llama", action="store_true")
    ap.add_argument("--wide", default="yes", choices=("yes", "no", "only"),
                    help="the Mixtral-width pairs against llama.cpp: yes (first table), no (keep the last "
                         "run's), only (measure just these, keep the other tables of the last run)")
    ap.add_argument("--wide-divisor", type=int, default=1, choices=(1, 2, 4, 8),
                    help="divide the Mixtral widths (1 = the real widths)")
    ap.add_argument("--wide-threads", default="1,2", help="thread counts of the Mixtral-width pairs")
    ap.add_argument("--wide-pairs", default=",".join(p[0] for p in PAIRS),
                    help="moepack recipes of the Mixtral-width pairs, in order (q4g128,q2g64,bf16)")
    ap.add_argument("--wide-repeats", default="3", help="runs per measurement, or one count per pair: 2,1,1")
    ap.add_argument("--wide-new-tokens", type=int, default=16)
    ap.add_argument("--wide-short-warmup", action="store_true",
                    help="warm up with 2 tokens after 64 prompt ids instead of a full run (full widths: minutes)")
    ap.add_argument("--wide-merge", action="store_true",
                    help="replace only the measured pairs' rows in the last Mixtral-width run (say, one disturbed)")
    ap.add_argument("--no-profile", action="store_true", help="skip the profile of the Mixtral-width run")
    ap.add_argument("--render-only", action="store_true", help="re-render the last measurements, measure nothing")
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    wide_json = BENCH_DIR / "peers_wide.json"
    wide = None
    if a.wide != "no" and not a.render_only:
        threads = tuple(int(t) for t in a.wide_threads.split(","))
        pairs = tuple(p for p in PAIRS if p[0] in a.wide_pairs.split(","))
        repeats = tuple(int(r) for r in a.wide_repeats.split(","))
        old = json.loads(wide_json.read_text()) if a.wide_merge and wide_json.exists() else None
        wide = measure_wide(a.wide_divisor, threads=threads, repeats=repeats, new_tokens=a.wide_new_tokens,
                            pairs=pairs, profile=not a.no_profile, save=None if old else wide_json,
                            short_warmup=a.wide_short_warmup)
        if old is not None and old.get("divisor") == wide["divisor"]:
            wide = merge_pairs(old, wide)
        wide_json.write_text(json.dumps(wide, indent=1, default=str))
    elif wide_json.exists():
        wide = json.loads(wide_json.read_text())
    if a.wide == "only":
        a.render_only = True
    opts = dict(repeats=a.repeats, new_tokens=a.new_tokens or (16 if a.quick else 32), threads=a.threads,
                ppl_tokens=a.ppl_tokens or (256 if a.quick else 1024), window=a.window, llama=not a.no_llama)
    toy = toy_model()
    if (a.model == "toy" or a.toy == "only") and toy is None:
        raise SystemExit("no trained toy model in the cache (python -m moepack.testing.toymodel trains it)")
    if a.render_only:  # re-render the last measurements (peers.json, peers_toy.json) without measuring
        sections = [render_wide(wide)] if wide else []
        if (BENCH_DIR / "peers.json").exists():
            m = json.loads((BENCH_DIR / "peers.json").read_text())
            sections.append("### Smaller models\n\n" + render(m, plots(m, "peers")))
        elif kept_tables():  # no measurements here: keep the tables the document has, with their machine
            sections.append(kept_tables())
        if (BENCH_DIR / "peers.json").exists() and (BENCH_DIR / "peers_toy.json").exists():
            t = json.loads((BENCH_DIR / "peers_toy.json").read_text())
            sections.append("### The same systems on the trained toy model (perplexity on real text)\n\n"
                            + render(t, plots(t, "peers_toy")))
        body = "\n\n".join(sections) + f"\n\n_Module wall time {time.perf_counter() - t0:.0f} s._\n"
        print(body)
        if not a.no_write:
            update_section("peers", body)
        return
    if a.toy == "only":  # keep the main table of the last run (peers.json), measure the toy model again
        m = json.loads((BENCH_DIR / "peers.json").read_text())
    else:
        m = measure(*(toy if a.model == "toy" else random_model()), **opts)
    sections = ([render_wide(wide)] if wide else []) + ["### Smaller models\n\n" + render(m, plots(m, "peers"))]
    if a.model != "toy" and a.toy in ("auto", "only"):
        if toy is None:
            sections.append("No trained toy model was cached when this ran, so there is no perplexity on a model "
                            "trained on real text (`python -m moepack.testing.toymodel` trains it).")
        else:
            t = measure(*toy, **{**opts, "ppl_tokens": opts["ppl_tokens"] * 4})
            sections.append("### The same systems on the trained toy model (perplexity on real text)\n\n"
                            + render(t, plots(t, "peers_toy")))
            (BENCH_DIR / "peers_toy.json").write_text(json.dumps(t, indent=1, default=str))
    (BENCH_DIR / "peers.json").write_text(json.dumps(m, indent=1, default=str))
    body = "\n\n".join(sections) + f"\n\n_Module wall time {time.perf_counter() - t0:.0f} s._\n"
    print(body)
    if not a.no_write:
        update_section("peers", body)


if __name__ == "__main__":
    main()
