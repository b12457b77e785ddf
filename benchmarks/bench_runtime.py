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
`--kernels` also runs benchmarks/bench_kernels.py and writes its table as the "kernels" section.

`--host` measures the per-layer host cost instead (section "host"): the trained toy model (a generated one of
its shape when none is cached) at one thread, its lossless pack decoded whole by moepack and its f16 GGUF by
llama.cpp in the same run, and writes the summary line that scripts read,
`toy decode vs llama.cpp f16: R.RRx; host overhead: N us per layer per token`, with the targets (host overhead
under HOST_TARGET_US, decode at least LLAMA_TARGET x llama.cpp), by how much they are missed, and a profile
of where a decoded token's time goes."""

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
    toy_mixtral,
    weight_bytes,
)
from benchmarks.report import markdown_table, update_section

HOST_TARGET_US = 100.0  # host overhead per layer and decoded token (issue 16)
LLAMA_TARGET = 0.5  # toy decode tokens/s against llama.cpp f16
TOY_SHAPE = ModelConfig(hidden=128, intermediate=256, layers=4, experts=8, vocab=2048, dtype="float32")

# the size: hidden 1024, 32 experts, 8 layers: 2.4 GB of bf16 experts
FULL = ModelConfig(hidden=1024, intermediate=1536, layers=8, experts=32)
QUICK = ModelConfig(hidden=1024, intermediate=1536, layers=4, experts=16)


def table_configs(ck: Path, packs: dict[str, Path], fraction: float) -> list[tuple[str, dict]]:
    """The runtime table's rows (label, worker job): transformers bf16 against the bf16 and q4g128 packs,
    whole and with `fraction` of the experts resident."""
    return [
        ("transformers bf16, whole", {"system": "transformers", "path": str(ck), "dtype": "bfloat16"}),
        ("moepack bf16 pack, whole", {"system": "moepack", "path": str(packs["bf16"])}),
        ("moepack q4g128 pack, whole", {"system": "moepack", "path": str(packs["q4g128"])}),
        (f"moepack q4g128 pack, {fraction:.0%} of experts",
         {"system": "moepack", "path": str(packs["q4g128"]), "expert_fraction": fraction}),
        (f"moepack bf16 pack, {fraction:.0%} of experts",
         {"system": "moepack", "path": str(packs["bf16"]), "expert_fraction": fraction}),
    ]


def measure(cfg: ModelConfig, *, threads: list[int], repeats: int, new_tokens: int, fraction: float = 0.25) -> dict:
    ck = checkpoint(cfg)
    packs = {"bf16": pack(ck, "bf16"), "q4g128": pack(ck, "q4g128")}
    prompt = token_ids(ck, PROMPT)
    base = {"prompt_ids": prompt, "repeats": repeats, "new_tokens": new_tokens, "context": 512}
    configs = table_configs(ck, packs, fraction)
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


HEADERS = ["configuration", "threads", "weights on disk", "TTFT ms", "decode tok/s", "decode vs transformers",
           "expert slots", "cache hit rate", "bytes moved / token", "peak RSS"]


def table_rows(m: dict, t: int, *, prefix: str = "") -> list[list[object]]:
    """The runtime table's rows of measurement `m` at `t` threads; ratios are against the transformers row of
    the same measurement and thread count. `prefix` goes before every configuration label."""
    res = m["results"]
    group = [r for r in res if r.get("threads") == t or (r.get("error") and r.get("threads") is None)]
    base = next((r for r in group if r.get("system") == "transformers" and "error" not in r), None)
    rows = []
    for r in group:
        if "error" in r:
            rows.append([prefix + str(r.get("label")), t, "-", "-", "-", "-", "-", "-", "-",
                         f"failed: {r['error'][:80]}"])
            continue
        ratio = f"{r['decode_tps'] / base['decode_tps']:.2f}x" if base else "-"
        slots = (f"{r['expert_slots']}/{r['total_experts']}" if r.get("expert_slots") is not None
                 else ("all" if r["system"] == "moepack" else "-"))
        size = weight_bytes(Path(m["ck"] if r["system"] == "transformers" else
                                 m["packs"]["bf16" if "bf16 pack" in r["label"] else "q4g128"]))
        rows.append([prefix + r["label"], t, fmt_bytes(size), f"{r['ttft_s'] * 1e3:.0f}", f"{r['decode_tps']:.2f}",
                     ratio, slots, fmt(r.get("cache_hit_rate"), ".1%") if r["system"] == "moepack" else "-",
                     fmt_bytes(r.get("bytes_moved_per_token")) if r["system"] == "moepack" else "-",
                     fmt_bytes(r["peak_rss_bytes"])])
    return rows


def method_text(m: dict) -> str:
    """How the runtime table's rows are measured, with the machine's load during measurement `m`."""
    return (
        f"Each row is its own process, `torch.set_num_threads(threads)`; prompt {m['prompt_tokens']} tokens, "
        f"{m['new_tokens']} new tokens greedy (no early stop), medians over {m['repeats']} runs after one warm-up. "
        f"transformers runs a manual greedy loop with its KV cache (prefill timed apart from decode). "
        f"moepack computes in float32 on the CPU (16-bit matrices stay 16-bit, widened in the kernels); "
        f"transformers in bfloat16. "
        f"Budgeted rows give the expert cache ceil({m['fraction']:.0%} x experts) slots (the runtime's default cache: "
        f"reuse with bypass); bytes moved / token is expert bytes loaded or streamed per decoded token. Peak RSS includes the interpreter, torch, "
        f"the checkpoint's mapped pages (transformers) and the experts read from the pack (moepack). The cores are shared with other work: 1-minute load "
        f"average {m['load'][0]:.1f} at the start and {m['load'][1]:.1f} at the end"
        + ("; compare rows of this table, not absolute numbers across runs." if max(m["load"]) <= (os.cpu_count() or 2)
           else ". With more runnable work than cores, two OpenMP threads stall at every barrier whenever one core "
           "is taken, so the 2-thread rows mostly measure the machine's load, and ratios are only meaningful "
           "between neighbouring rows." if max(m["threads"]) > 1 else
           ". With more runnable work than cores, one thread also waits for a core at times: ratios are only "
           "meaningful between neighbouring rows, not absolute numbers across runs."))


def render(m: dict) -> str:
    cfg = m["cfg"]
    rows = [row for t in m["threads"] for row in table_rows(m, t)]
    text = [
        f"Model: generated Mixtral layout (random weights), hidden {cfg.hidden}, expert intermediate "
        f"{cfg.intermediate}, {cfg.layers} layers x {cfg.experts} experts (top-2), vocab {cfg.vocab}, "
        f"{cfg.dtype}; {fmt_bytes(cfg.expert_bytes)} of experts in the checkpoint"
        + (" (the issue's suggested size)." if cfg == FULL else " (--quick: scaled down from the issue's size)."),
        "",
        method_text(m),
        "",
        markdown_table(HEADERS, rows),
    ]
    return "\n".join(text)


def measure_host(*, repeats: int, new_tokens: int) -> dict:
    """moepack (bf16 pack, whole, 1 thread) and llama.cpp f16 on the toy model, plus a moepack profile."""
    ck = toy_mixtral() or checkpoint(TOY_SHAPE)
    pk = pack(ck, "bf16")
    base = {"prompt_ids": token_ids(ck, PROMPT), "repeats": repeats, "new_tokens": new_tokens, "context": 256,
            "threads": 1}  # the toy model's positions
    load0 = os.getloadavg()[0]
    log("host: moepack bf16 pack, whole, 1 thread")
    mp = run_worker({**base, "system": "moepack", "path": str(pk), "label": "moepack bf16 pack"})
    log("host: the same, Python forward (MOEPACK_FUSED_DECODE=0)")
    os.environ["MOEPACK_FUSED_DECODE"] = "0"  # inherited by the worker: the reference path, same run
    try:
        ref = run_worker({**base, "system": "moepack", "path": str(pk), "label": "moepack bf16 pack, Python"})
    finally:
        del os.environ["MOEPACK_FUSED_DECODE"]
    prof = run_worker({**base, "system": "moepack", "path": str(pk), "profile": True, "repeats": 0})
    budget = op_budget(pk, base["prompt_ids"])
    llama, why = None, None
    try:
        from benchmarks.peers.gguf import convert, ensure_llama_cpp

        why = ensure_llama_cpp()
        if why is None:
            log("host: llama.cpp f16, 1 thread")
            llama = run_worker({**base, "system": "llamacpp", "path": str(convert(ck, "f16")),
                                "label": "llama.cpp f16"})
            why = llama.get("error")
    except Exception as exc:  # noqa: BLE001 - a missing peer is reported in the section, not fatal
        why = f"{type(exc).__name__}: {exc}"
    return {"checkpoint": str(ck), "trained": ck.name != TOY_SHAPE.name, "moepack": mp, "python": ref,
            "profile": prof,
            "llama": llama if why is None else None, "llama_missing": why, "layers": TOY_SHAPE.layers,
            "budget": budget,
            "load": (load0, os.getloadavg()[0]), "repeats": repeats, "new_tokens": new_tokens,
            "prompt_tokens": len(base["prompt_ids"])}


def op_budget(pack_path: Path, prompt: list[int]) -> dict:
    """Why the host time is what it is: torch operators and Python calls per decoded token and layer (the torch
    profiler and cProfile over 32 decode steps, the difference of a 41- and a 9-token run), and what one small
    operator costs on this machine now (an elementwise multiply of a hidden-state row, best of 5 x 2000)."""
    import cProfile
    import pstats

    import torch
    from torch.profiler import ProfilerActivity, profile

    from moepack.runtime.api import MoePackModel

    torch.set_num_threads(1)
    pm = MoePackModel.load(pack_path, device="cpu", context=256)  # the toy model's positions
    pm.generate(prompt, max_new_tokens=4, stop_at_eos=False)

    def ops(n: int) -> int:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            pm.generate(prompt, max_new_tokens=n, stop_at_eos=False)
        return sum(e.count for e in prof.key_averages())

    def calls(n: int) -> int:
        pr = cProfile.Profile()
        pr.enable()
        pm.generate(prompt, max_new_tokens=n, stop_at_eos=False)
        pr.disable()
        return pstats.Stats(pr).total_calls

    per = 32 * pm.spec.num_layers
    x = torch.randn(1, pm.spec.hidden_size)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(2000):
            x * x  # noqa: B018 - the cost of one small operator is what is measured
        best = min(best, (time.perf_counter() - t0) / 2000)
    return {"ops_per_layer": (ops(41) - ops(9)) / per, "python_calls_per_layer": (calls(41) - calls(9)) / per,
            "small_op_us": best * 1e6}


def host_line(m: dict) -> str:
    """The summary line scripts read (docs/benchmarks.md)."""
    mp, llama = m["moepack"], m["llama"]
    host = f"host overhead: {mp['host_overhead_s_per_layer'] * 1e6:.0f} us per layer per token"
    if llama is None:
        return f"{host} (llama.cpp f16 not measured: {m['llama_missing']})"
    return f"toy decode vs llama.cpp f16: {mp['decode_tps'] / llama['decode_tps']:.2f}x; {host}"


def render_host(m: dict) -> str:
    mp, llama = m["moepack"], m["llama"]
    if "error" in mp:
        return f"moepack failed: {mp['error']}"
    host_us = mp["host_overhead_s_per_layer"] * 1e6
    token_us = 1e6 / mp["decode_tps"]
    rows = [["moepack bf16 pack, whole", f"{mp['decode_tps']:.0f}", f"{token_us:.0f}", f"{host_us:.0f}",
             f"{host_us * m['layers'] / token_us:.0%}"]]
    ref = m.get("python") or {}
    if "decode_tps" in ref:
        ref_host, ref_us = ref["host_overhead_s_per_layer"] * 1e6, 1e6 / ref["decode_tps"]
        rows.append(["moepack, Python forward (MOEPACK_FUSED_DECODE=0)", f"{ref['decode_tps']:.0f}",
                     f"{ref_us:.0f}", f"{ref_host:.0f}", f"{ref_host * m['layers'] / ref_us:.0%}"])
    if llama is not None:
        rows.append(["llama.cpp f16", f"{llama['decode_tps']:.0f}", f"{1e6 / llama['decode_tps']:.0f}", "-", "-"])
    verdict = [f"- host overhead {host_us:.0f} us per layer per token against a target of {HOST_TARGET_US:.0f} "
               + ("(met)." if host_us <= HOST_TARGET_US else f"(missed by {host_us - HOST_TARGET_US:.0f} us, "
                                                            f"{host_us / HOST_TARGET_US:.1f}x the target).")]
    if llama is not None:
        ratio = mp["decode_tps"] / llama["decode_tps"]
        verdict.append(f"- decode {ratio:.2f}x llama.cpp f16 against a target of {LLAMA_TARGET:.2f}x "
                       + ("(met)." if ratio >= LLAMA_TARGET else
                          f"(missed: moepack would need {LLAMA_TARGET * llama['decode_tps']:.0f} tok/s, "
                          f"{LLAMA_TARGET / ratio:.1f}x its speed)."))
    else:
        verdict.append(f"- llama.cpp f16 was not measured in this run ({m['llama_missing']}), so the decode ratio "
                       f"is missing from the summary line.")
    prof = m["profile"].get("profile") or []
    if isinstance(prof, dict):  # the worker profiles decode and prefill apart
        prof = prof.get("decode") or []
    if "decode_tps" in ref:
        same = "the same tokens" if ref.get("tokens") == mp.get("tokens") else "DIFFERENT tokens"
        verdict.append(f"- the fused decode (runtime/fused_decode.py) against the Python forward it replaces, "
                       f"same run: {mp['decode_tps'] / ref['decode_tps']:.2f}x the tokens/s, host overhead "
                       f"{ref_host:.0f} -> {host_us:.0f} us per layer, {same}.")
    b = m.get("budget")
    if b:
        verdict.append(
            f"- where the time goes: each layer of a decoded token runs {b['ops_per_layer']:.0f} torch operators "
            f"(nested ones included, most of them inside the two C++ calls) and {b['python_calls_per_layer']:.0f} "
            f"Python calls (the executor's routing and cache bookkeeping, counters, the call arguments); one "
            f"small operator costs {b['small_op_us']:.1f} us on this machine now. The rest of a token is outside "
            f"the layers: embedding, final norm, lm_head, sampling and the engine's step.")
    model = ("the trained toy Mixtral" if m["trained"] else
             "a generated checkpoint of the toy Mixtral's size (the trained one is not cached on this machine)")
    return "\n".join([
        host_line(m), "",
        f"Model: {model} ({Path(m['checkpoint']).name}; hidden 128, expert intermediate 256, 4 layers x 8 "
        f"experts, top-2). One thread, prompt {m['prompt_tokens']} tokens, {m['new_tokens']} new tokens greedy, "
        f"medians over {m['repeats']} runs after a warm-up, each system in its own process. Host overhead is "
        f"`host_overhead_s_per_layer` of `run --json`: per decoded token and layer, the layer's wall time minus "
        f"the time inside kernel calls and copies. In the fused decode a layer is two compiled calls, its "
        f"dense work (norms, q/k/v, rotary, KV write, attention, o, router top-k: `decode_layer`) and its "
        f"routed experts (`moe_token`), both counted as kernel time; what is left is Python between them. "
        f"In the Python forward the kernel calls are the products and the attention core. 1-minute load "
        f"average {m['load'][0]:.1f} at the start and {m['load'][1]:.1f} at the end (2 cores shared: wall times "
        f"include waiting for a core).", "",
        markdown_table(["system", "decode tok/s", "us per token", "host us / layer / token", "host share"], rows),
        "", *verdict, "",
        "Where a decoded token's time goes (moepack, torch profiler over one generation after a warm-up; the "
        "first row is the generation's wall time and, in brackets, the time inside all operators; the rest of "
        "the wall time is Python between operators):", "",
        markdown_table(["operator", "self CPU ms", "calls", "share of wall"], prof) if prof else
        f"(profile failed: {m['profile'].get('error')})",
    ])


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
    ap.add_argument("--host", action="store_true", help="measure the per-layer host cost on the toy model "
                    "against llama.cpp f16 (section 'host') instead")
    a = ap.parse_args(argv)
    if a.host:
        m = measure_host(repeats=a.repeats, new_tokens=a.new_tokens or 64)
        (BENCH_DIR / "host.json").write_text(json.dumps(m, indent=1, default=str))
        body = render_host(m)
        print(body)
        if not a.no_write:
            update_section("host", body)
        return
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
