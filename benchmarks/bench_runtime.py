"""Runtime speed on the CPU: moepack against transformers on the same checkpoint (issue 3).

    python -m benchmarks.bench_runtime [--quick] [--threads 1,2] [--repeats 5] [--new-tokens 32] [--kernels]

On a generated Mixtral-layout checkpoint (benchmarks.peers.common.ModelConfig), for each thread count:
  * transformers, AutoModelForCausalLM in bfloat16 (the checkpoint's dtype), whole model in memory: the baseline;
  * moepack whole (no budget) with the lossless bf16 pack and the INT4 pack (q4g128);
  * moepack with an expert budget of 25% of the pack's experts (INT4 and lossless): the runtime's default cache
    (reuse with bypass), streamed misses.
Every configuration runs in its own process (peak RSS is its own), greedy, exactly N new tokens after the same
prompt ids; time to first token and decode tokens/s are medians over `--repeats` runs after a warm-up, and
ratios are against transformers measured in the same run. Writes the "runtime" section of docs/benchmarks.md;
`--kernels` also runs benchmarks/bench_kernels.py and writes its table as the "kernels" section."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.peers.common import (
    BENCH_DIR,
    PROMPT,
    ROOT,
    ModelConfig,
    checkpoint,
    fmt,
    fmt_bytes,
    log,
    pack,
    run_worker,
    token_ids,
    weight_bytes,
)
from benchmarks.report import markdown_table, update_section

# the size: hidden 1024, 32 experts, 8 layers: 2.4 GB of bf16 experts
FULL = ModelConfig(hidden=1024, intermediate=1536, layers=8, experts=32)
QUICK = ModelConfig(hidden=1024, intermediate=1536, layers=4, experts=16)


def measure(cfg: ModelConfig, *, threads: list[int], repeats: int, new_tokens: int, fraction: float = 0.25) -> dict:
    ck = checkpoint(cfg)
    packs = {"bf16": pack(ck, "bf16"), "q4g128": pack(ck, "q4g128")}
    prompt = token_ids(ck, PROMPT)
    base = {"prompt_ids": prompt, "repeats": repeats, "new_tokens": new_tokens, "context": 512}
    configs = [
        ("transformers bf16, whole", {"system": "transformers", "path": str(ck), "dtype": "bfloat16"}),
        ("moepack bf16 pack, whole", {"system": "moepack", "path": str(packs["bf16"])}),
        ("moepack q4g128 pack, whole", {"system": "moepack", "path": str(packs["q4g128"])}),
        (f"moepack q4g128 pack, {fraction:.0%} of experts",
         {"system": "moepack", "path": str(packs["q4g128"]), "expert_fraction": fraction}),
        (f"moepack bf16 pack, {fraction:.0%} of experts",
         {"system": "moepack", "path": str(packs["bf16"]), "expert_fraction": fraction}),
    ]
    results = []
    load0 = os.getloadavg()[0]
    for t in threads:
        for label, job in configs:
            log(f"runtime: {label}, {t} thread(s)")
            r = run_worker({**base, **job, "threads": t, "label": label})
            if "error" in r:
                log(f"  failed: {r['error']}")
            else:
                log(f"  ttft {r['ttft_s'] * 1e3:.0f} ms, decode {r['decode_tps']:.2f} tok/s, rss {fmt_bytes(r['peak_rss_bytes'])}")
            results.append(r)
    return {"cfg": cfg, "ck": ck, "packs": packs, "results": results, "prompt_tokens": len(prompt),
            "load": (load0, os.getloadavg()[0]),
            "threads": threads, "repeats": repeats, "new_tokens": new_tokens, "fraction": fraction}


def render(m: dict) -> str:
    cfg, res = m["cfg"], m["results"]
    headers = ["configuration", "threads", "weights on disk", "TTFT ms", "decode tok/s", "decode vs transformers",
               "expert slots", "cache hit rate", "bytes moved / token", "peak RSS"]
    rows = []
    for t in m["threads"]:
        group = [r for r in res if r.get("threads") == t or (r.get("error") and r.get("threads") is None)]
        base = next((r for r in group if r.get("system") == "transformers" and "error" not in r), None)
        for r in group:
            if "error" in r:
                rows.append([r.get("label"), t, "-", "-", "-", "-", "-", "-", "-", f"failed: {r['error'][:80]}"])
                continue
            ratio = f"{r['decode_tps'] / base['decode_tps']:.2f}x" if base else "-"
            slots = (f"{r['expert_slots']}/{r['total_experts']}" if r.get("expert_slots") is not None
                     else ("all" if r["system"] == "moepack" else "-"))
            size = weight_bytes(Path(m["ck"] if r["system"] == "transformers" else
                                     m["packs"]["bf16" if "bf16 pack" in r["label"] else "q4g128"]))
            rows.append([r["label"], t, fmt_bytes(size), f"{r['ttft_s'] * 1e3:.0f}", f"{r['decode_tps']:.2f}", ratio,
                         slots, fmt(r.get("cache_hit_rate"), ".1%") if r["system"] == "moepack" else "-",
                         fmt_bytes(r.get("bytes_moved_per_token")) if r["system"] == "moepack" else "-",
                         fmt_bytes(r["peak_rss_bytes"])])
    text = [
        f"Model: generated Mixtral layout (random weights), hidden {cfg.hidden}, expert intermediate "
        f"{cfg.intermediate}, {cfg.layers} layers x {cfg.experts} experts (top-2), vocab {cfg.vocab}, "
        f"{cfg.dtype}; {fmt_bytes(cfg.expert_bytes)} of experts in the checkpoint"
        + (" (the issue's suggested size)." if cfg == FULL else " (--quick: scaled down from the issue's size)."),
        "",
        f"Each row is its own process, `torch.set_num_threads(threads)`; prompt {m['prompt_tokens']} tokens, "
        f"{m['new_tokens']} new tokens greedy (no early stop), medians over {m['repeats']} runs after one warm-up. "
        f"transformers runs a manual greedy loop with its KV cache (prefill timed apart from decode). "
        f"moepack computes in float32 on the CPU (dense weights upcast at load); transformers in bfloat16. "
        f"Budgeted rows give the expert cache ceil({m['fraction']:.0%} x experts) slots (the runtime's default cache: "
        f"reuse with bypass); bytes moved / token is expert bytes loaded or streamed per decoded token. Peak RSS includes the interpreter, torch and "
        f"file pages mapped from the pack or checkpoint. The cores are shared with other work: 1-minute load "
        f"average {m['load'][0]:.1f} at the start and {m['load'][1]:.1f} at the end"
        + (". With more runnable work than cores, two OpenMP threads stall at every barrier whenever one core is "
           "taken, so the 2-thread rows mostly measure the machine's load, and ratios are only meaningful between "
           "neighbouring rows." if max(m["load"]) > (os.cpu_count() or 2) else
           "; compare rows of this table, not absolute numbers across runs."),
        "",
        markdown_table(headers, rows),
    ]
    return "\n".join(text)


def kernels_section(quick: bool = False) -> str | None:
    """Run benchmarks/bench_kernels.py (the colleague's module) and return its markdown, or None if absent."""
    path = ROOT / "benchmarks" / "bench_kernels.py"
    if not path.exists():
        return None
    args = ["--threads", "1,2"] + (["--shapes", "4096x1024", "--repeats", "10"] if quick else [])
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    log("kernels: running benchmarks/bench_kernels.py " + " ".join(args))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_kernels", *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=900)
    if proc.returncode != 0:
        return f"bench_kernels.py failed (exit {proc.returncode}):\n\n```\n{proc.stderr.strip()[-1500:]}\n```\n"
    lines = proc.stdout.splitlines()
    table = "\n".join(ln for ln in lines if not ln.startswith("#")).strip()
    return (f"Output of `python -m benchmarks.bench_kernels {' '.join(args)}` (GEMV, one token; CPP = fused C++ "
            f"kernels, TORCH = codec reference; see the module's docstring).\n\n{table}\n")


def write_kernels(quick: bool = False) -> None:
    text = kernels_section(quick)
    if text is None:
        log("kernels: benchmarks/bench_kernels.py not found; section not written")
        return
    src = (ROOT / "benchmarks" / "bench_kernels.py").read_text()
    if "update_section" in src:  # the module writes its own section
        return
    update_section("kernels", text)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 thread only, 16 new tokens")
    ap.add_argument("--threads", default=None, help="comma-separated thread counts (default 1,2)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=None)
    ap.add_argument("--kernels", action="store_true", help="also run bench_kernels.py (section 'kernels')")
    ap.add_argument("--no-write", action="store_true", help="print the section instead of writing it")
    ap.add_argument("--render-only", action="store_true", help="re-render the last measurement, measure nothing")
    a = ap.parse_args(argv)
    threads = [int(t) for t in (a.threads or ("1" if a.quick else "1,2")).split(",")]
    new_tokens = a.new_tokens or (16 if a.quick else 32)
    if a.render_only:  # re-render the last measurement (runtime.json)
        m = json.loads((BENCH_DIR / "runtime.json").read_text())
        m["cfg"] = ModelConfig(**m["cfg"])
        body = render(m)
        print(body)
        if not a.no_write:
            update_section("runtime", body)
        return
    t0 = time.perf_counter()
    m = measure(QUICK if a.quick else FULL, threads=threads, repeats=a.repeats, new_tokens=new_tokens)
    (BENCH_DIR / "runtime.json").write_text(json.dumps({**m, "cfg": m["cfg"].__dict__}, indent=1, default=str))
    body = render(m) + f"\n_Module wall time {time.perf_counter() - t0:.0f} s._\n"
    print(body)
    if not a.no_write:
        update_section("runtime", body)
    if a.kernels:
        write_kernels(a.quick)


if __name__ == "__main__":
    main()
