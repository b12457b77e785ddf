"""Throughput mode against one prompt at a time, and the planner's predictions against the measurements.

    python -m benchmarks.bench_throughput [--prompts 32] [--new 24] [--batches 1,2,4,8] [--batch-sizes 1,4]
                                          [--budgets 0.10,0.25] [--dtype bfloat16|float32]

A generated Mixtral-layout model (hidden 1024, intermediate 2816, 8 layers, 8 experts top-2, vocab 2048,
q4g128; built once and kept under $MOEPACK_HOME/bench) runs the same prompts (random ids, 8..40 tokens)
one at a time through `MoePackModel.generate` and through `generate_many` with 1, 2, 4, 8 batches of 1 and
of 4 sequences, at expert budgets of 10% and 25% of the experts (cache slots), every row in one compute
dtype (bfloat16 by default). Reports generated tokens/s across all prompts, mean per-prompt latency, expert
loads, the stall fraction from the runtime's own timers, and the planner's prediction for each row from
measured and calibrated hardware numbers and a collected routing trace. Torch runs one
compute thread (the machine's cores are shared; the loader thread takes the other core).
Writes the "throughput" section of docs/benchmarks.md."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from benchmarks.report import markdown_table, update_section

SHAPE = dict(hidden=1024, intermediate=2816, layers=8, experts=8, vocab=2048)


def bench_pack() -> Path:
    home = Path(os.environ.get("MOEPACK_HOME", Path.home() / ".cache" / "moepack")) / "bench"
    out = home / "throughput-{hidden}x{intermediate}x{layers}x{experts}.moepack".format(**SHAPE)
    if not (out / "manifest.json").exists():
        from moepack.compress import compress
        from moepack.testing.checkpoints import make_random_checkpoint

        src = make_random_checkpoint(home / "throughput-src", **SHAPE)
        compress(str(src), out, recipe="q4g128", force=True)
    return out


def machine_speed_probe(dtype: torch.dtype):
    """A fixed small workload (bf16/float GEMMs of this model's expert shape), timed before the run and after
    every row: its time relative to the first shows how much the machine's own speed drifted during the run."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(64, SHAPE["hidden"], generator=g).to(dtype)
    b = torch.randn(SHAPE["hidden"], SHAPE["intermediate"], generator=g).to(dtype)

    def once() -> float:
        t0 = time.perf_counter()
        for _ in range(20):
            torch.mm(a, b)
        return time.perf_counter() - t0

    once()
    return lambda: min(once() for _ in range(5))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--new", type=int, default=24)
    ap.add_argument("--batches", default="1,2,4,8")
    ap.add_argument("--batch-sizes", default="1,4", help="sequences per batch; each size runs every --batches")
    ap.add_argument("--budgets", default="0.10,0.25")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", default="bfloat16", help="compute dtype of every row (float32 or bfloat16)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from moepack.runtime.calibrate import calibrate_engine, measure_hardware
    from moepack.runtime.planner import ModelShape, predict
    from moepack.runtime.routing_trace import collect_trace
    from moepack.runtime.throughput import generate_many, load_for_throughput

    path = bench_pack()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(2, SHAPE["vocab"], (int(n),), generator=g).tolist()
               for n in torch.randint(8, 41, (args.prompts,), generator=g)]
    lens = [len(p) for p in prompts]
    total_experts = SHAPE["layers"] * SHAPE["experts"]
    probe = load_for_throughput(path, vram=None, batches=1, slots=total_experts, context=128, dtype=args.dtype)
    trace = collect_trace(probe, [prompts[0], prompts[1]], max_new_tokens=8)
    hw = measure_hardware(probe)
    shape = ModelShape.from_pack(probe.pack, trace=trace, dtype=probe.model.dtype)
    hw = calibrate_engine(probe, shape, hw)  # every expert is resident in the probe
    speed = machine_speed_probe(probe.model.dtype)
    at_calibration = speed()
    del probe
    prefetch = hw.overlap >= 0.25  # a prefetch only pays when its copy can hide under compute
    print(hw)
    rows, summary = [], []
    for frac in (float(b) for b in args.budgets.split(",")):
        slots = max(2, round(frac * total_experts))
        pm = load_for_throughput(path, vram=None, batches=1, slots=slots, context=128, dtype=args.dtype)
        t0 = time.perf_counter()
        stall, lat, toks = 0.0, [], 0
        loads0 = pm.executor.streamer.loads
        for p in prompts:  # the engine with one sequence, one prompt at a time
            g = pm.generate(p, max_new_tokens=args.new, stop_at_eos=False)
            toks, stall = toks + len(g.tokens), stall + g.stats.stall_s
            lat.append(time.perf_counter() - t0)
        wall = time.perf_counter() - t0
        base_tps = toks / wall
        pred = predict(shape, hw, batches=1, slots=slots, pipelined=False, prompts=lens, max_new_tokens=args.new,
                       engine=False)
        pred_base = pred.run_tokens_per_s
        rows.append([f"{frac:.0%} ({slots})", "one at a time", f"{base_tps:.2f}", "1.00x", f"{sum(lat) / len(lat):.2f}",
                     pm.executor.streamer.loads - loads0, f"{stall / wall:.1%}",
                     f"{pred.run_tokens_per_s:.2f}", f"{pred.run_tokens_per_s / base_tps - 1:+.0%}", "",
                     f"{at_calibration / speed():.2f}"])
        print(rows[-1], flush=True)
        sizes = [int(b) for b in args.batch_sizes.split(",")]
        for size, n in ((size, int(b)) for size in sizes for b in args.batches.split(",")):
            pm = load_for_throughput(path, vram=None, batches=n, batch_size=size, slots=slots, context=128,
                                     dtype=args.dtype)
            res = generate_many(pm, prompts, batches=n, batch_size=size, max_new_tokens=args.new, stop_at_eos=False,
                                trace=trace, prefetch=prefetch)
            s = res.stats
            pred = predict(shape, hw, batches=n, slots=slots, prompts=lens, max_new_tokens=args.new, batch_size=size)
            rows.append([f"{frac:.0%} ({slots})", f"{n} batches of {size}", f"{s.tokens_per_s:.2f}",
                         f"{s.tokens_per_s / base_tps:.2f}x", f"{s.mean_latency_s:.2f}", s.loads,
                         f"{s.stall_fraction:.1%}", f"{pred.run_tokens_per_s:.2f}",
                         f"{pred.run_tokens_per_s / s.tokens_per_s - 1:+.0%}",
                         f"{(pred.run_tokens_per_s / pred_base) / (s.tokens_per_s / base_tps) - 1:+.0%}",
                         f"{at_calibration / speed():.2f}"])
            print(rows[-1], flush=True)
            if n == max(int(b) for b in args.batches.split(",")):
                summary.append((frac, n, size, s.tokens_per_s / base_tps))
    md = (f"Model: generated Mixtral layout {SHAPE}, q4g128, {total_experts} experts of "
          f"{shape.expert_bytes / 1e6:.2f} MB; {args.prompts} prompts of {min(lens)}..{max(lens)} tokens, "
          f"{args.new} new tokens each (greedy, no EOS stop); torch threads: {args.threads}; compute dtype "
          f"{args.dtype} (every row, the baseline too). N batches of B: N x B "
          f"sequences in flight, the MoE of all of them stacked per layer step. Budget = expert cache "
          f"slots as a share of all experts. Stall = time compute waited for expert loads / wall time. Planner "
          f"speed-up error: predicted (tokens/s / one at a time) against measured, which cancels a change of the "
          f"machine's speed between calibration and measurement (this shared 2-core VM drifted by up to a third "
          f"between runs minutes apart). Machine speed: a fixed GEMM workload timed after each row, relative to its time "
          f"right after the planner's calibration (below 1: the machine got slower than when it was measured).\n\n"
          f"Measured hardware for the planner: link {hw.link_gbps:.2f} GB/s, expert call "
          f"{hw.expert_fixed_s * 1e3:.2f} ms + {hw.expert_token_s * 1e3:.3f} ms/token, dense "
          f"{hw.dense_token_s * 1e3:.3f} ms/token/layer, head {hw.head_token_s * 1e3:.3f} ms/token (linear fits; the "
          f"planner uses the measured curves); from its calibration runs (docs/planning.md, medians of 5): overlap "
          f"{', '.join(f'{o:.0%} at {n}' for n, o in hw.overlap_curve)}, engine compute factors "
          f"{', '.join(f'{f:.2f} at {n}' for n, f in hw.engine_scale)} (sequences in flight), plain-runtime factor "
          f"{hw.plain_scale:.2f}; routing from a 2-prompt trace; next-layer prefetch "
          f"{'on' if prefetch else 'off (no measured overlap: copies would compete with compute)'}.\n\n"
          + markdown_table(["budget (slots)", "mode", "tokens/s", "vs one at a time", "mean latency s",
                            "expert loads", "stall", "planner tokens/s", "planner error",
                            "planner speed-up error", "machine speed"], rows)
          + "\n" + "\n".join(f"- {f:.0%} budget, {n} batches of {size}: {x:.2f}x the tokens/s of one at a time"
                              for f, n, size, x in summary) + "\n")
    print(md)
    if not args.no_write:
        update_section("throughput", md)


if __name__ == "__main__":
    main()
