"""Runtime speed on the families added by issue 20 (DeepSeek-V3, GPT-OSS): the runtime table's rows for each.

    python -m benchmarks.bench_runtime_families [--family deepseek_v3,gpt_oss] [--threads 1] [--repeats 5]
                                                [--new-tokens 32] [--no-write]

For each family, a checkpoint of a few hundred MB generated with transformers' own class (random weights,
bf16), then the rows of benchmarks/bench_runtime.py: transformers in bfloat16 with the whole model in memory
against moepack's lossless and q4g128 packs, whole and with 25% of the experts resident. Each row is its own
process (benchmarks/peers/worker.py), medians over `--repeats` runs after a warm-up; ratios are against the
same family's transformers row. Writes the "runtime-families" section of docs/benchmarks.md: one table in
the runtime table's columns, a row set per family.

  * deepseek_v3: multi-head latent attention with q_lora_rank, one dense leading layer, a shared expert,
    sigmoid routing over groups with the correction bias, YaRN (moepack.testing.checkpoints);
  * gpt_oss: fused [E, ...] expert tensors with biases and the clamped SwiGLU, attention sinks, sliding and
    full attention layers alternating, softmax after the top-k, YaRN (moepack.testing.gpt_oss), at odd
    widths (hidden 1152, q/k/v 1024/256/256 wide)."""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.bench_runtime import HEADERS, method_text, table_configs, table_rows
from benchmarks.peers.common import BENCH_DIR, PROMPT, fmt_bytes, log, pack, run_worker, token_ids
from benchmarks.report import markdown_table, update_section

STD = 0.03  # weights N(0, STD): small enough that the random activations stay finite through the layers

# transformers' DeepseekV3Config fields beside the baby defaults (moepack.testing.checkpoints.baby_config)
DEEPSEEK = dict(hidden_size=1024, num_attention_heads=16, num_key_value_heads=16, num_hidden_layers=4,
                first_k_dense_replace=1, intermediate_size=2816, moe_intermediate_size=512, n_routed_experts=32,
                num_experts_per_tok=4, n_group=4, topk_group=2, n_shared_experts=1, kv_lora_rank=256,
                q_lora_rank=384, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, vocab_size=2048,
                max_position_embeddings=1024,
                rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                                     original_max_position_embeddings=256, mscale=1.0, mscale_all_dim=1.0))

# transformers' GptOssConfig fields beside the baby defaults (moepack.testing.gpt_oss.gpt_oss_config); the
# released models' swiglu_limit (7.0) and sliding-window layout, a window shorter than prompt + new tokens
GPT_OSS = dict(hidden_size=1152, intermediate_size=384, num_hidden_layers=4, num_attention_heads=16,
               num_key_value_heads=4, head_dim=64, num_local_experts=32, num_experts_per_tok=4,
               sliding_window=64, swiglu_limit=7.0, vocab_size=2048, max_position_embeddings=1024,
               rope_parameters=dict(rope_type="yarn", rope_theta=150000.0, factor=4.0, beta_fast=32.0,
                                    beta_slow=1.0, truncate=False, original_max_position_embeddings=256))


def _make_deepseek(path: Path) -> None:
    from moepack.testing.checkpoints import make_baby_checkpoint

    make_baby_checkpoint("deepseek_v3", path, dtype="bfloat16", std=STD, **DEEPSEEK)


def _make_gpt_oss(path: Path) -> None:
    from moepack.testing.gpt_oss import make_gpt_oss_checkpoint

    make_gpt_oss_checkpoint(path, dtype="bfloat16", std=STD, **GPT_OSS)


def _describe_deepseek(s: dict) -> str:
    return (f"DeepSeek-V3 (transformers' DeepseekV3ForCausalLM): hidden {s['hidden_size']}, "
            f"{s['num_hidden_layers']} layers (the first dense, intermediate {s['intermediate_size']}), "
            f"{s['n_routed_experts']} routed experts of intermediate {s['moe_intermediate_size']} "
            f"(top-{s['num_experts_per_tok']}, sigmoid scores in {s['n_group']} groups, {s['topk_group']} "
            f"eligible, correction bias) + {s['n_shared_experts']} shared expert; latent attention: "
            f"{s['num_attention_heads']} heads, kv_lora_rank {s['kv_lora_rank']}, q_lora_rank "
            f"{s['q_lora_rank']}, nope/rope/v head dims {s['qk_nope_head_dim']}/{s['qk_rope_head_dim']}/"
            f"{s['v_head_dim']}; YaRN; vocab {s['vocab_size']}. moepack caches the attention latent "
            f"(kv_lora_rank + rope dims per token and layer).")


def _describe_gpt_oss(s: dict) -> str:
    return (f"GPT-OSS (transformers' GptOssForCausalLM): hidden {s['hidden_size']}, "
            f"{s['num_hidden_layers']} layers alternating sliding-window ({s['sliding_window']} tokens) and "
            f"full attention, {s['num_attention_heads']} query / {s['num_key_value_heads']} key-value heads "
            f"of {s['head_dim']} with attention sinks, {s['num_local_experts']} experts of intermediate "
            f"{s['intermediate_size']} stored fused on disk (top-{s['num_experts_per_tok']}, softmax after "
            f"the top-k, biased projections, clamped SwiGLU with limit {s['swiglu_limit']}); YaRN; vocab "
            f"{s['vocab_size']}.")


@dataclass(frozen=True)
class Family:
    """One family's benchmark model: transformers config fields, how to generate it, how to describe it."""
    key: str  # the model_type
    title: str
    shape: dict[str, Any]
    make: Callable[[Path], None]
    describe: Callable[[dict], str]
    sparse_layers: int
    experts: int
    intermediate: int

    @property
    def name(self) -> str:  # the checkpoint's directory in BENCH_DIR
        s = self.shape
        return f"{self.key}-h{s['hidden_size']}-e{self.experts}-l{s['num_hidden_layers']}"

    @property
    def expert_bytes(self) -> int:  # routed experts' three bf16 matrices (biases left out)
        return self.sparse_layers * self.experts * 3 * self.intermediate * self.shape["hidden_size"] * 2


FAMILIES: dict[str, Family] = {
    "deepseek_v3": Family("deepseek_v3", "DeepSeek-V3", DEEPSEEK, _make_deepseek, _describe_deepseek,
                          sparse_layers=DEEPSEEK["num_hidden_layers"] - DEEPSEEK["first_k_dense_replace"],
                          experts=DEEPSEEK["n_routed_experts"], intermediate=DEEPSEEK["moe_intermediate_size"]),
    "gpt_oss": Family("gpt_oss", "GPT-OSS", GPT_OSS, _make_gpt_oss, _describe_gpt_oss,
                      sparse_layers=GPT_OSS["num_hidden_layers"], experts=GPT_OSS["num_local_experts"],
                      intermediate=GPT_OSS["intermediate_size"]),
}


def checkpoint(fam: Family) -> Path:
    path = BENCH_DIR / fam.name
    if not (path / "config.json").exists():
        log(f"generating checkpoint {path}")
        partial = path.with_name(path.name + ".partial")
        fam.make(partial)
        partial.rename(path)
    return path


def measure(fam: Family, *, threads: list[int], repeats: int, new_tokens: int, fraction: float = 0.25) -> dict:
    ck = checkpoint(fam)
    packs = {"bf16": pack(ck, "bf16"), "q4g128": pack(ck, "q4g128", rtn=True)}
    base = {"prompt_ids": token_ids(ck, PROMPT), "repeats": repeats, "new_tokens": new_tokens, "context": 512}
    configs = table_configs(ck, packs, fraction)
    results, load0 = [], os.getloadavg()[0]
    for t in threads:
        for label, job in configs:
            log(f"runtime-families: {fam.title}: {label}, {t} thread(s)")
            r = run_worker({**base, **job, "threads": t, "label": label})
            log(f"  failed: {r['error']}" if "error" in r else f"  decode {r['decode_tps']:.2f} tok/s")
            results.append(r)
    return {"family": fam.key, "ck": str(ck), "packs": {k: str(v) for k, v in packs.items()}, "results": results,
            "prompt_tokens": len(base["prompt_ids"]), "load": (load0, os.getloadavg()[0]), "threads": threads,
            "repeats": repeats, "new_tokens": new_tokens, "fraction": fraction}


def body(ms: list[dict]) -> str:
    """The section: one model paragraph per family, how rows are measured, one table of every family's rows."""
    fams = [FAMILIES[m["family"]] for m in ms]
    models = [f"- {f.describe(f.shape)} {fmt_bytes(f.expert_bytes)} of routed experts." for f in fams]
    rows = []
    for m in ms:
        m = {**m, "ck": Path(m["ck"]), "packs": {k: Path(v) for k, v in m["packs"].items()}}
        rows += [row for t in m["threads"] for row in table_rows(m, t, prefix=f"{FAMILIES[m['family']].title}: ")]
    load = (min(m["load"][0] for m in ms), max(m["load"][1] for m in ms))
    return "\n".join([
        f"Models: generated with transformers' own classes (random weights N(0, {STD}), bfloat16), each a "
        f"few hundred MB. The q4g128 packs are encoded by round-to-nearest (the same format and kernels; the "
        f"weights are random). Ratios are against the same family's transformers row. Greedy tokens are not "
        f"compared here: transformers runs in bfloat16 and moepack in float32, and random weights give near "
        f"ties, so the two part after a few tokens (parity against transformers in float32 is what "
        f"tests/test_deepseek.py and tests/test_gpt_oss.py check).", "",
        *models, "",
        method_text({**ms[0], "load": load}), "",
        markdown_table(HEADERS, rows),
    ])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--family", default=",".join(FAMILIES),
                    help=f"comma-separated families (default {','.join(FAMILIES)})")
    ap.add_argument("--threads", default="1", help="comma-separated thread counts (default 1)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--no-write", action="store_true", help="print the section instead of writing it")
    a = ap.parse_args(argv)
    names = [n.strip() for n in a.family.split(",") if n.strip()]
    unknown = [n for n in names if n not in FAMILIES]
    if unknown or not names:
        ap.error(f"unknown family {', '.join(unknown) or '(none)'}; choose from {', '.join(FAMILIES)}")
    t0 = time.perf_counter()
    ms = [measure(FAMILIES[n], threads=[int(t) for t in a.threads.split(",")], repeats=a.repeats,
                  new_tokens=a.new_tokens) for n in names]
    (BENCH_DIR / "runtime-families.json").write_text(json.dumps(ms, indent=1, default=str))
    text = body(ms) + f"\n_Module wall time {time.perf_counter() - t0:.0f} s._\n"
    print(text)
    if not a.no_write:
        update_section("runtime-families", text)


if __name__ == "__main__":
    main()
