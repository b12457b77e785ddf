"""Runtime speed on a DeepSeek-V3-layout model: the runtime table's rows for that family (issue 20).

    python -m benchmarks.bench_runtime_deepseek [--threads 1] [--repeats 5] [--new-tokens 32] [--no-write]

A DeepSeek-V3 checkpoint of a few hundred MB generated with transformers' own class (random weights, bf16:
multi-head latent attention with q_lora_rank, one dense leading layer, a shared expert, sigmoid routing over
groups with the correction bias, YaRN), then the rows of benchmarks/bench_runtime.py: transformers in
bfloat16 with the whole model in memory against moepack's lossless and q4g128 packs, whole and with 25% of
the experts resident. Each row is its own process (benchmarks/peers/worker.py), medians over `--repeats` runs
after a warm-up. Writes the "runtime-deepseek" section of docs/benchmarks.md in the runtime table's format."""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from benchmarks.bench_runtime import render
from benchmarks.peers.common import BENCH_DIR, PROMPT, fmt_bytes, log, pack, run_worker, token_ids
from benchmarks.report import update_section

# transformers' DeepseekV3Config fields beside the baby defaults (moepack.testing.checkpoints.baby_config)
SHAPE = dict(hidden_size=1024, num_attention_heads=16, num_key_value_heads=16, num_hidden_layers=4,
             first_k_dense_replace=1, intermediate_size=2816, moe_intermediate_size=512, n_routed_experts=32,
             num_experts_per_tok=4, n_group=4, topk_group=2, n_shared_experts=1, kv_lora_rank=256,
             q_lora_rank=384, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, vocab_size=2048,
             max_position_embeddings=1024,
             rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                                  original_max_position_embeddings=256, mscale=1.0, mscale_all_dim=1.0))


class Shape:
    """What bench_runtime.render reads of a model configuration."""

    def __init__(self, s: dict):
        self.hidden, self.intermediate = s["hidden_size"], s["moe_intermediate_size"]
        self.layers, self.experts, self.vocab, self.dtype = s["num_hidden_layers"], s["n_routed_experts"], \
            s["vocab_size"], "bfloat16"
        sparse = s["num_hidden_layers"] - s["first_k_dense_replace"]
        self.expert_bytes = sparse * self.experts * 3 * self.intermediate * self.hidden * 2


def checkpoint() -> Path:
    from moepack.testing.checkpoints import make_baby_checkpoint

    path = BENCH_DIR / "deepseek_v3-h1024-e32-l4"
    if not (path / "config.json").exists():
        log(f"generating checkpoint {path}")
        partial = path.with_name(path.name + ".partial")
        make_baby_checkpoint("deepseek_v3", partial, dtype="bfloat16", std=0.03, **SHAPE)
        partial.rename(path)
    return path


def measure(*, threads: list[int], repeats: int, new_tokens: int, fraction: float = 0.25) -> dict:
    ck = checkpoint()
    packs = {"bf16": pack(ck, "bf16"), "q4g128": pack(ck, "q4g128", rtn=True)}
    base = {"prompt_ids": token_ids(ck, PROMPT), "repeats": repeats, "new_tokens": new_tokens, "context": 512}
    configs = [
        ("transformers bf16, whole", {"system": "transformers", "path": str(ck), "dtype": "bfloat16"}),
        ("moepack bf16 pack, whole", {"system": "moepack", "path": str(packs["bf16"])}),
        ("moepack q4g128 pack, whole", {"system": "moepack", "path": str(packs["q4g128"])}),
        (f"moepack q4g128 pack, {fraction:.0%} of experts",
         {"system": "moepack", "path": str(packs["q4g128"]), "expert_fraction": fraction}),
        (f"moepack bf16 pack, {fraction:.0%} of experts",
         {"system": "moepack", "path": str(packs["bf16"]), "expert_fraction": fraction}),
    ]
    results, load0 = [], os.getloadavg()[0]
    for t in threads:
        for label, job in configs:
            log(f"runtime-deepseek: {label}, {t} thread(s)")
            r = run_worker({**base, **job, "threads": t, "label": label})
            log(f"  failed: {r['error']}" if "error" in r else f"  decode {r['decode_tps']:.2f} tok/s")
            results.append(r)
    return {"ck": str(ck), "packs": {k: str(v) for k, v in packs.items()}, "results": results,
            "prompt_tokens": len(base["prompt_ids"]), "load": (load0, os.getloadavg()[0]), "threads": threads,
            "repeats": repeats, "new_tokens": new_tokens, "fraction": fraction}


def body(m: dict) -> str:
    shape = Shape(SHAPE)
    table = render({**m, "cfg": shape, "ck": Path(m["ck"]), "packs": {k: Path(v) for k, v in m["packs"].items()}})
    s = SHAPE
    model = (f"Model: generated DeepSeek-V3 layout (transformers' DeepseekV3ForCausalLM, random weights, "
             f"bfloat16), hidden {s['hidden_size']}, {s['num_hidden_layers']} layers (the first dense, "
             f"intermediate {s['intermediate_size']}), {s['n_routed_experts']} routed experts of intermediate "
             f"{s['moe_intermediate_size']} (top-{s['num_experts_per_tok']}, sigmoid scores in {s['n_group']} "
             f"groups, {s['topk_group']} eligible, correction bias) + {s['n_shared_experts']} shared expert; "
             f"latent attention: {s['num_attention_heads']} heads, kv_lora_rank {s['kv_lora_rank']}, "
             f"q_lora_rank {s['q_lora_rank']}, nope/rope/v head dims {s['qk_nope_head_dim']}/"
             f"{s['qk_rope_head_dim']}/{s['v_head_dim']}; YaRN; vocab {s['vocab_size']}; "
             f"{fmt_bytes(shape.expert_bytes)} of routed experts. The q4g128 pack is encoded by "
             "round-to-nearest (the same format and kernels; the weights are random). moepack caches the "
             "attention latent (kv_lora_rank + rope dims per token and layer); transformers caches them too.")
    return model + "\n" + table.split("\n", 1)[1]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", default="1", help="comma-separated thread counts (default 1)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--no-write", action="store_true", help="print the section instead of writing it")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    m = measure(threads=[int(t) for t in a.threads.split(",")], repeats=a.repeats, new_tokens=a.new_tokens)
    (BENCH_DIR / "runtime-deepseek.json").write_text(json.dumps(m, indent=1, default=str))
    text = body(m) + f"\n_Module wall time {time.perf_counter() - t0:.0f} s._\n"
    print(text)
    if not a.no_write:
        update_section("runtime-deepseek", text)


if __name__ == "__main__":
    main()
