"""`moepack plan`: measure (or take) link and device speed, then choose batches, slots and hot experts."""

from __future__ import annotations

import json

from rich.console import Console
from rich.table import Table

from moepack.units import format_size, parse_size

TRACE_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "In the beginning the universe was created. This has made a lot of people very angry.",
    "Mixture-of-experts models route every token to a few experts out of many.",
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
]


def trace_prompts(pm, count: int) -> list[list[int]]:
    if pm.tokenizer is not None:
        return [pm.encode(t) for t in (TRACE_TEXTS * count)[:count]]
    import torch

    g = torch.Generator().manual_seed(0)
    return [torch.randint(2, pm.spec.vocab_size, (16,), generator=g).tolist() for _ in range(count)]


def make_plan(pack: str, *, vram: str, link_gbps=None, device_tflops=None, mem_gbps=None, context: int = 2048,
              device: str = "auto", backend: str = "auto", trace_count: int = 4, prompts: list[int] | None = None,
              max_new_tokens: int = 64, batch_size: int = 1, dtype: str = "auto"):
    """(Plan, MoePackModel) for a pack path or name."""
    from moepack.errors import BudgetError
    from moepack.format import Pack
    from moepack.runtime.api import MoePackModel, pick_device
    from moepack.runtime.planner import ModelShape, choose, measure_hardware, slots_for
    from moepack.runtime.routing_trace import collect_trace, manifest_trace
    from moepack.source import resolve_pack

    budget = parse_size(vram)
    with Pack(resolve_pack(pack)) as p:  # fail on a hopeless budget before measuring anything
        shape = ModelShape.from_pack(p)
    if slots_for(shape, budget, 1, context, batch_size) < shape.top_k:
        raise BudgetError(f"--vram {vram} is too small: dense weights, {batch_size} KV cache(s) of {context} tokens and "
                          f"{shape.top_k} expert slots need more; compress harder or shorten --context")
    on_cuda = pick_device(device).type == "cuda"
    pm = MoePackModel.load(resolve_pack(pack), vram=vram if on_cuda else None, device=device, backend=backend,
                           context=context, dtype=dtype)
    trace = manifest_trace(pm.pack)
    if trace is None and trace_count > 0:
        trace = collect_trace(pm, trace_prompts(pm, trace_count), max_new_tokens=8)
    shape = ModelShape.from_pack(pm.pack, trace=trace, dtype=pm.model.dtype, device=pm.model.device)
    # every expert fits the budget: calibrate the engine's overheads (and its overlap) on short runs
    calibrate = (device_tflops is None and not on_cuda
                 and shape.total_experts * shape.expert_bytes + shape.dense_bytes <= budget)
    hw = measure_hardware(pm, link_gbps=link_gbps, device_tflops=device_tflops, mem_gbps=mem_gbps,
                          measure_overlap=not calibrate)
    if calibrate:
        from moepack.runtime.planner import calibrate_engine
        from moepack.runtime.throughput import load_for_throughput

        hw = calibrate_engine(load_for_throughput(pm.pack.path, vram=None, batches=1, device=device, backend=backend,
                                                  context=64, dtype=dtype), shape, hw)
    return choose(shape, hw, budget, context=context, prompts=prompts, max_new_tokens=max_new_tokens,
                  batch_size=batch_size), pm


def run(pack: str, *, vram: str, link_gbps, device_tflops, mem_gbps, context: int, device: str, backend: str,
        trace_count: int, json_out: bool, batch_size: int = 1, dtype: str = "auto") -> None:
    err = Console(stderr=True)
    with err.status("measuring", spinner="dots"):
        plan, _ = make_plan(pack, vram=vram, link_gbps=link_gbps, device_tflops=device_tflops, mem_gbps=mem_gbps,
                            context=context, device=device, backend=backend, trace_count=trace_count,
                            batch_size=batch_size, dtype=dtype)
    if json_out:
        print(json.dumps(plan.to_json(), indent=1))
        return
    print_plan(Console(), plan)


def print_plan(console: Console, plan) -> None:
    hw, shape, best = plan.hardware, plan.shape, plan.best
    console.print(f"[bold]{shape.name}[/]: {shape.total_experts} experts of {format_size(shape.expert_bytes)}, "
                  f"dense {format_size(shape.dense_bytes)}; routing from {shape.probs_source}", highlight=False)
    console.print(f"hardware ({hw.source}): link {hw.link_gbps:.2f} GB/s, expert call {hw.expert_fixed_s * 1e3:.2f} ms "
                  f"+ {hw.expert_token_s * 1e3:.3f} ms/token, dense {hw.dense_token_s * 1e3:.3f} ms/token/layer, "
                  f"head {hw.head_token_s * 1e3:.3f} ms/token, overlap "
                  + (", ".join(f"{o:.0%} at {n} seqs" for n, o in hw.overlap_curve) or f"{hw.overlap:.0%}"),
                  highlight=False)
    t = Table(title=f"predicted decode (batches of {best.batch_size} sequences; per step: every sequence +1 token)")
    for col in ("batches", "slots", "hot", "tokens/s", "step ms", "compute ms", "transfer ms", "stall ms",
                "loads/step", "MB/token"):
        t.add_column(col, justify="right")
    for p in plan.table:
        mark = "[bold green]" if p is best else ""
        t.add_row(f"{mark}{p.batches}", str(p.slots), str(p.hot), f"{p.tokens_per_s:.2f}", f"{p.step_s * 1e3:.1f}",
                  f"{p.compute_s * 1e3:.1f}", f"{p.transfer_s * 1e3:.1f}", f"{p.stall_s * 1e3:.1f}",
                  f"{p.loads_per_step:.1f}", f"{p.bytes_per_token / 1e6:.2f}")
    console.print(t)
    size = f" --batch-size {best.batch_size}" if best.batch_size > 1 else ""
    console.print(f"plan: [bold]--batches {best.batches}{size}[/], {best.slots} expert slots "
                  f"({best.hot} hot experts pinned, {best.slots - best.hot} streaming): {plan.reason}", highlight=False)
