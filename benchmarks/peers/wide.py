"""moepack against llama.cpp at Mixtral-8x7B's real expert widths (a generated 2-layer checkpoint).

Three pairs at about the same expert bits per weight: moepack q4g128 / llama.cpp Q4_K_M, q2g64 / Q2_K and the
lossless bf16 pack / GGUF f16, each at every thread count asked for. Each measurement runs in its own process
(benchmarks/peers/worker.py), moepack and llama.cpp alternating within a pair so that drift in the machine's
load hits both; both get the same 512 prompt token ids. Figures: decode tokens/s (greedy, exactly N tokens),
time to first token on the prompt, peak RSS, bits per weight of the expert matrices as stored (pack expert
records, or the GGUF's `*_exps` tensors), medians over the repeats after a warm-up. The quantised packs are
encoded round-to-nearest (common.pack(rtn=True): same format, bits and kernels as the default encoder, whose
scale search would take hours at these sizes on two cores), as llama.cpp's quantiser does without an imatrix. `divisor` > 1 divides
every width (moepack.testing.checkpoints.mixtral_width_shape) to develop the harness fast; only divisor 1
writes the summary lines that scripts read."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

from benchmarks.peers import gguf
from benchmarks.peers.common import (
    BENCH_DIR,
    fmt_bytes,
    log,
    pack,
    run_worker,
    shakespeare,
    token_ids,
    weight_bytes,
)
from benchmarks.report import markdown_table

PAIRS = (("q4g128", "Q4_K_M"), ("q2g64", "Q2_K"), ("bf16", "f16"))
ISA_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni", "avx512_bf16",
             "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16")


def wide_name(divisor: int, layers: int = 2, vocab: int = 512) -> str:
    return f"mixtral-width-d{divisor}-l{layers}-v{vocab}-bfloat16"


def wide_checkpoint(divisor: int, layers: int = 2, vocab: int = 512) -> Path:
    """The generated checkpoint (cached in the benchmark folder; written to a .partial folder, then renamed)."""
    from moepack.testing.checkpoints import make_mixtral_width_checkpoint

    path = BENCH_DIR / wide_name(divisor, layers, vocab)
    if not (path / "config.json").exists():
        log(f"generating checkpoint {path}")
        tmp = path.with_name(path.name + ".partial")
        make_mixtral_width_checkpoint(tmp, divisor=divisor, layers=layers, vocab=vocab)
        tmp.rename(path)
    return path


def cpu_flags() -> str:
    """The machine's CPU model and the SIMD flags that matter to these kernels (from /proc/cpuinfo)."""
    model, flags = "?", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model == "?":
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return f"{model}; {os.cpu_count()} cores; " + " ".join(f for f in ISA_FLAGS if f in flags)


def pack_expert_bpw(path: Path) -> float:
    """Bits per weight of a pack's expert matrices: expert record bytes over expert weights."""
    from moepack.format.reader import Pack

    with Pack(path) as p:
        weights = sum(math.prod(pr.shape) for e in p.manifest.experts for pr in e.projections.values())
        return 8 * p.expert_bytes / weights


def gguf_expert_bpw(path: Path) -> float:
    """Bits per weight of a GGUF's expert tensors (`blk.N.ffn_{gate,up,down}_exps.weight`), as stored."""
    tensors = [t for t in _gguf_tensors(path) if "_exps" in t.name]
    if not tensors:
        raise RuntimeError(f"{path}: no *_exps tensors")
    return 8 * sum(int(t.n_bytes) for t in tensors) / sum(int(t.n_elements) for t in tensors)


def pack_token_bytes(path: Path) -> tuple[float, float]:
    """(weights read per decoded token, of which dense) for a pack: every dense tensor but the embedding (a row
    lookup) plus top_k / experts of the expert bytes of each layer."""
    from moepack.format.reader import Pack

    with Pack(path) as p:
        dense = sum(t.nbytes for t in p.manifest.tensors if "embed_tokens" not in t.name)
        share = p.spec.top_k / p.spec.num_experts
        return dense + share * p.expert_bytes, dense


def gguf_token_bytes(path: Path, top_k: int = 2, experts: int = 8) -> tuple[float, float]:
    """(weights read per decoded token, of which dense) for a GGUF, counted as for a pack."""
    tensors = _gguf_tensors(path)
    dense = sum(int(t.n_bytes) for t in tensors if "_exps" not in t.name and t.name != "token_embd.weight")
    return dense + top_k / experts * sum(int(t.n_bytes) for t in tensors if "_exps" in t.name), dense


def _gguf_tensors(path: Path) -> list:
    gguf_py = str(gguf.CONVERTER_DIR / "gguf-py")
    if gguf_py not in sys.path:
        sys.path.insert(0, gguf_py)
    from gguf import GGUFReader

    return list(GGUFReader(str(path)).tensors)


def prompt_ids(ck: Path, n: int) -> list[int]:
    ids = token_ids(ck, shakespeare(20 * n))
    if len(ids) < n:
        raise RuntimeError(f"only {len(ids)} prompt tokens from the corpus, {n} needed")
    return ids[:n]


def measure_wide(divisor: int = 1, *, threads: tuple[int, ...] = (1, 2), repeats: int | tuple[int, ...] = 3,
                 new_tokens: int = 16,
                 prompt_tokens: int = 512, pairs=PAIRS, profile: bool = True, save: Path | None = None,
                 short_warmup: bool = False) -> dict:
    """Every pair at every thread count; returns the rows and what the section needs to render them. With
    `save`, the measurements so far are written there (JSON) after every pair, so an interrupted run renders.
    `repeats` may give one count per pair (in `pairs` order; the last applies to the rest)."""
    per_pair = tuple(repeats) if isinstance(repeats, (tuple, list)) else (repeats,)
    ck = wide_checkpoint(divisor)
    notes: list[str] = []
    prompt = prompt_ids(ck, prompt_tokens)
    context = prompt_tokens + new_tokens + 8
    base = {"prompt_ids": prompt, "new_tokens": new_tokens, "context": context,
            "short_warmup": short_warmup}
    why = gguf.ensure_llama_cpp()
    if why is not None:
        notes.append(f"llama.cpp rows are missing: {why}")
    load0 = os.getloadavg()[0]
    rows: list[dict] = []
    out = {"ck": str(ck), "divisor": divisor, "rows": rows, "notes": notes, "repeats": per_pair,
           "new_tokens": new_tokens, "prompt_tokens": len(prompt), "threads": list(threads),
           "load": (load0, load0), "cpu": cpu_flags(), "short_warmup": short_warmup}

    def checkpoint_json() -> None:
        out["load"] = (load0, os.getloadavg()[0])
        if save is not None:
            save.write_text(json.dumps(out, indent=1, default=str))

    for i, (recipe, quant) in enumerate(pairs):
        reps = per_pair[min(i, len(per_pair) - 1)]
        mp = pack(ck, recipe, rtn=True)
        gpath, bpw_l, tok_l = None, None, None
        if why is None:
            try:
                f16 = gguf.convert(ck, "f16")
                gpath = f16 if quant == "f16" else gguf.quantize(f16, quant)
                bpw_l, tok_l = gguf_expert_bpw(gpath), gguf_token_bytes(gpath)
            except Exception as exc:  # noqa: BLE001 - reported in the section
                notes.append(f"llama.cpp {quant}: {exc}")
        bpw_m, tok_m = pack_expert_bpw(mp), pack_token_bytes(mp)
        for t in threads:
            pair = {"recipe": recipe, "quant": quant, "threads": t, "repeats": reps}
            jobs = [("moepack", {"system": "moepack", "path": str(mp), "label": f"moepack {recipe}"}, mp, bpw_m,
                     tok_m)]
            if gpath is not None:
                jobs.append(("llamacpp", {"system": "llamacpp", "path": str(gpath), "label": f"llama.cpp {quant}"},
                             gpath, bpw_l, tok_l))
            for key, job, weights, bpw, tok in jobs:
                log(f"wide: {job['label']}, {t} thread(s)")
                r = run_worker({**base, **job, "threads": t, "repeats": reps}, timeout=3000)
                r.update(weights_path=str(weights), bpw=bpw, token_bytes=tok)
                if "error" in r:
                    log(f"  failed: {r['error']}")
                else:
                    log(f"  ttft {r['ttft_s']:.2f} s, decode {r['decode_tps']:.2f} tok/s, "
                        f"rss {fmt_bytes(r['peak_rss_bytes'])}")
                pair[key] = r
            rows.append(pair)
            checkpoint_json()
    if profile:
        out["profiles"] = profiles(ck, prompt, new_tokens)
        checkpoint_json()
    return out


def profiles(ck: Path, prompt: list[int], new_tokens: int, threads: tuple[int, ...] = (1, 2)) -> dict:
    """Where moepack's q4g128 time goes: torch profiler tables of decode and of the prefill at each thread count
    (keys "decode", "prefill" at 1 thread, "decode@2", "prefill@2", ...)."""
    mp = pack(ck, "q4g128", rtn=True)
    out = {}
    for t in threads:
        r = run_worker({"system": "moepack", "path": str(mp), "threads": t, "prompt_ids": prompt,
                        "new_tokens": max(new_tokens, 2), "repeats": 0, "context": len(prompt) + new_tokens + 8,
                        "profile": True}, timeout=3000)
        failed = [["failed", r.get("error", "?"), "", ""]]
        for what, rows in (r.get("profile") or {"decode": failed, "prefill": failed}).items():
            out[what if t == 1 else f"{what}@{t}"] = rows
    return out


def merge_pairs(old: dict, new: dict) -> dict:
    """`old` with the rows of the pairs `new` measured replaced by `new`'s (and `new`'s profiles), noting when."""
    redone = {p["recipe"] for p in new["rows"]}
    rows = [p for p in old["rows"] if p["recipe"] not in redone] + new["rows"]
    order = [r for r, _ in PAIRS]
    rows.sort(key=lambda p: (order.index(p["recipe"]) if p["recipe"] in order else 99, p["threads"]))
    note = (f"The {', '.join(sorted(redone))} pair(s) were measured again at {time.strftime('%H:%M UTC', time.gmtime())}"
            f" (load average {new['load'][0]:.1f} to {new['load'][1]:.1f}); the other rows are from the first run.")
    loads = (*old["load"], *new["load"])  # the range over both runs: the rows mix them
    return {**old, "rows": rows, "notes": old["notes"] + new["notes"] + [note], "load": (min(loads), max(loads)),
            "profiles": new.get("profiles") or old.get("profiles")}


def _reps(m: dict) -> str:
    """The repeat count(s) of a run, per pair where they differ."""
    reps = {(p["recipe"], p.get("repeats", m["repeats"])) for p in m["rows"]}
    counts = {r for _, r in reps}
    if len(counts) <= 1:
        return str(next(iter(counts), m["repeats"]))
    return "/".join(f"{r} ({recipe})" for recipe, r in sorted(reps, key=lambda x: -x[1]))


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def summary_lines(m: dict) -> list[str]:
    """The lines scripts read (divisor 1), or the same figures under a `mixtral-width/D` prefix."""
    q4 = [p for p in m["rows"] if p["quant"] == "Q4_K_M" and _ok(p)]
    if not q4:
        return []
    name = "mixtral-width" if m["divisor"] == 1 else f"mixtral-width/{m['divisor']}"
    dec = {p["threads"]: p["moepack"]["decode_tps"] / p["llamacpp"]["decode_tps"] for p in q4}
    ttft = {p["threads"]: p["llamacpp"]["ttft_s"] / p["moepack"]["ttft_s"] for p in q4}
    parts = ", ".join(f"{dec[t]:.2f}x at {t} thread{'s' if t > 1 else ''}" for t in sorted(dec))
    worst = min(ttft, key=ttft.get)
    return [f"{name} decode vs llama.cpp Q4_K_M: {parts}",
            f"{name} TTFT vs llama.cpp Q4_K_M: {ttft[worst]:.2f}x",
            f"(TTFT line: llama.cpp's time over moepack's at {worst} thread{'s' if worst > 1 else ''}, the lower of "
            + ", ".join(f"{ttft[t]:.2f}x at {t}" for t in sorted(ttft)) + "; above 1 is better.)"]


def _tok(r: dict) -> str:
    t = r.get("token_bytes")
    return f"{fmt_bytes(t[0])} ({fmt_bytes(t[1])})" if t else "-"


# profile operators by what they do (torch profiler keys)
KINDS = (("fused expert kernels", ("moepack_cpu::qmatmul", "moepack_cpu::qmatmul_t")),
         ("bf16/fp16 dense kernels", ("moepack_cpu::pmatmul", "moepack_cpu::pmatmul_t")),
         ("BLAS GEMM (aten::mm/addmm/matmul)", ("aten::mm", "aten::addmm", "aten::addmm_", "aten::matmul",
                                              "aten::bmm", "aten::linear")),
         ("dequantisation", ("moepack_cpu::qdequant",)))


def _shares(rows: list[list]) -> str:
    """'kind A%, kind B%, other operators C%, outside operators D%' from a profile table."""
    try:
        wall = float(str(rows[0][1]).split()[0])
        ops = {r[0]: float(r[1]) for r in rows[1:]}
    except (IndexError, ValueError):
        return "profile unavailable"
    parts, used = [], 0.0
    for kind, names in KINDS:
        ms = sum(v for k, v in ops.items() if k in names)
        if ms:
            parts.append(f"{kind} {ms / wall:.0%}")
            used += ms
    total = float(str(rows[0][1]).split("(")[1].rstrip(")")) if "(" in str(rows[0][1]) else sum(ops.values())
    parts.append(f"other operators {(total - used) / wall:.0%}")
    parts.append(f"outside operators (Python, waiting) {max(0.0, wall - total) / wall:.0%}")
    return ", ".join(parts)


def verdicts(m: dict) -> list[str]:
    """For the q4g128 / Q4_K_M pair: each missed target, by how much, and where moepack's time goes."""
    out = []
    prof = m.get("profiles") or {}
    for p in m["rows"]:
        if p["quant"] != "Q4_K_M" or not _ok(p):
            continue
        mo, ll, t = p["moepack"], p["llamacpp"], p["threads"]
        th = f"{t} thread{'s' if t > 1 else ''}"
        dec = mo["decode_tps"] / ll["decode_tps"]
        if dec < 1.0:
            why = ""
            if mo.get("token_bytes") and ll.get("token_bytes"):
                bw_m, bw_l = (r["decode_tps"] * r["token_bytes"][0] / 1e9 for r in (mo, ll))
                why = (f" moepack reads {fmt_bytes(mo['token_bytes'][0])} of weights per token against llama.cpp's "
                       f"{fmt_bytes(ll['token_bytes'][0])}; the dense part alone is {fmt_bytes(mo['token_bytes'][1])} "
                       f"against {fmt_bytes(ll['token_bytes'][1])} (the pack keeps dense weights in the source "
                       f"dtype, the GGUF quantises them). Weights streamed per second: moepack {bw_m:.1f} GB/s, "
                       f"llama.cpp {bw_l:.1f} GB/s.")
            if "decode" in prof:
                key = "decode" if t == 1 else f"decode@{t}"
                if key in prof:
                    why += f" Decode profile ({th}): {_shares(prof[key])}."
            out.append(f"- Decode at {th}: {dec:.2f}x llama.cpp Q4_K_M, {1 - dec:.0%} short of 1.0x.{why}")
        ttft = ll["ttft_s"] / mo["ttft_s"]
        if ttft < 1.0:
            key = "prefill" if t == 1 else f"prefill@{t}"
            why = f" Prefill profile ({th}): {_shares(prof[key])}." if key in prof else ""
            out.append(f"- Time to first token at {th}: {mo['ttft_s']:.2f} s against llama.cpp's {ll['ttft_s']:.2f} s "
                       f"({mo['ttft_s'] / ll['ttft_s'] - 1:.0%} longer; target: at most llama.cpp's).{why}")
    return out


def _ok(p: dict) -> bool:
    return all(k in p and "error" not in p[k] for k in ("moepack", "llamacpp"))


def render_wide(m: dict) -> str:
    from moepack.testing.checkpoints import mixtral_width_shape

    s = mixtral_width_shape(m["divisor"])
    headers = ["pair", "threads", "system", "expert bits/weight", "weights on disk", "peak RSS", "TTFT s",
               "decode tok/s", "decode moepack/llama", "TTFT llama/moepack", "CPU s/run", "CPU llama/moepack",
               "weights read/token (dense)"]
    table = []
    for p in m["rows"]:
        for key in ("moepack", "llamacpp"):
            r = p.get(key)
            if r is None:
                continue
            pair = f"{p['recipe']} / {p['quant']}"
            wb = fmt_bytes(weight_bytes(Path(r["weights_path"]))) if Path(r["weights_path"]).exists() else "-"
            if "error" in r:
                table.append([pair, p["threads"], r.get("label"), f"{r['bpw']:.3f}" if r.get("bpw") else "-", wb,
                              "-", "-", "-", "-", f"failed: {r['error'][:80]}", "-", "-", "-"])
                continue
            dec = ttft = cpu = ""
            if key == "moepack" and _ok(p):
                dec = _ratio(r["decode_tps"], p["llamacpp"]["decode_tps"])
                ttft = _ratio(p["llamacpp"]["ttft_s"], r["ttft_s"])
                cpu = _ratio(p["llamacpp"].get("cpu_s_per_run"), r.get("cpu_s_per_run"))
            table.append([pair, p["threads"], r["label"], f"{r['bpw']:.3f}" if r.get("bpw") else "-", wb,
                          fmt_bytes(r["peak_rss_bytes"]), f"{r['ttft_s']:.2f}", f"{r['decode_tps']:.2f}", dec, ttft,
                          f"{r['cpu_s_per_run']:.2f}" if r.get("cpu_s_per_run") else "-", cpu, _tok(r)])
    llama_info = next((p["llamacpp"].get("system_info") for p in m["rows"] if "llamacpp" in p
                       and p["llamacpp"].get("system_info")), None)
    kernel = next((p["moepack"].get("kernel") for p in m["rows"] if "moepack" in p and p["moepack"].get("kernel")),
                  None)
    text = [
        ("### Mixtral-8x7B widths against llama.cpp\n" if m["divisor"] == 1 else
         f"### Mixtral-8x7B widths divided by {m['divisor']}, against llama.cpp\n"),
        f"Model: a generated Mixtral checkpoint with random weights at hidden {s['hidden']}, expert intermediate "
        f"{s['intermediate']}, {s['experts']} experts top-{s['top_k']}, {s['heads']}/{s['kv_heads']} query/key-value "
        f"heads of 128, 2 layers, vocabulary 512, bf16 (`{Path(m['ck']).name}`). Prompt {m['prompt_tokens']} token "
        f"ids (the same for both systems), {m['new_tokens']} new tokens greedy, medians over {_reps(m)} runs "
        f"after one warm-up ({'2 tokens after 64 prompt ids' if m.get('short_warmup') else 'a full run'}); "
        f"CPU s/run is the process's CPU time for one whole generation (prefill and decode, all threads), which "
        f"load from other work inflates far less than wall time. Each measurement in its own process, the two systems of a pair alternating. "
        f"Whole model in memory for both (no budget). moepack's quantised packs are encoded round-to-nearest "
        f"(`compress(..., rtn=True)`; the same format and kernels as the default encoder), as llama.cpp quantises "
        f"without an importance matrix. Machine: {m['cpu']}. 1-minute load average "
        f"from {min(m['load']):.1f} to {max(m['load']):.1f} over the runs (the two cores are shared).",
        "",
        "\n".join(summary_lines(m)),
        "",
        markdown_table(headers, table),
    ]
    if kernel:
        text.append(f"moepack kernels: {kernel}.")
    if llama_info:
        text.append(f"llama.cpp system info: `{llama_info.strip()}`.")
        if "AMX_INT8" not in llama_info and "amx_int8" in m["cpu"]:
            text.append("llama.cpp runs without its AMX kernels: built with AMX off, because on this virtual machine "
                        "its AMX Q4_K kernel dies of SIGILL on `tilezero` (benchmarks/peers/gguf.py).")
    if max(m["load"]) > (os.cpu_count() or 1):
        text.append("The load average exceeded the core count during the run: every figure is a share of a "
                    "contended machine, and two-thread runs suffer most (each thread waits for the other, "
                    "descheduled, at every synchronisation), so read the 2-thread rows as a lower bound.")
    missed = verdicts(m)
    if missed:
        text.append("\nTargets missed (issue 17: decode at least 1.0x llama.cpp Q4_K_M, time to first token at most "
                    "llama.cpp's):\n\n" + "\n".join(missed))
    for what, rows in (m.get("profiles") or {}).items():
        what, _, t = what.partition("@")
        t = t or "1"
        text.append(f"\nmoepack q4g128 {what} at {t} thread{'s' if t != '1' else ''}, torch profiler, top operators "
                    "by self CPU time:\n")
        text.append(markdown_table(["operator", "self CPU ms", "calls", "share"], rows))
    if m["notes"]:
        text.append("\n".join(f"- {n}" for n in m["notes"]))
    return "\n".join(text)
