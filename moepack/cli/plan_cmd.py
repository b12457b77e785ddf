"""`moepack plan`: measure (or take) link and device speed, then choose batches, slots and hot experts."""

from __future__ import annotations

import json
from dataclasses import replace

from rich import box
from rich.console import Console
from rich.table import Table

from moepack.units import format_size

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


def make_plan(pack: str, config, *, link_gbps=None, device_tflops=None, mem_gbps=None, trace_count: int = 4,
              prompts: list[int] | None = None, max_new_tokens: int = 64, remeasure: bool = False):
    """(Plan, MoePackModel) for a pack path or name and a RunConfig with a budget. The hardware measurements
    are cached per machine and pack; `remeasure` takes them again."""
    from moepack.errors import ConfigError
    from moepack.format import Pack
    from moepack.runtime.api import MoePackModel, parse_dtype, pick_device
    from moepack.runtime.budget import plan_budget
    from moepack.runtime.calibrate import cached_hardware, machine_key, measure_hardware, store_hardware
    from moepack.runtime.planner import ModelShape, choose
    from moepack.runtime.routing_trace import collect_trace, manifest_trace
    from moepack.source import resolve_pack

    if config.vram is None:
        raise ConfigError("moepack plan needs --vram: the budget it plans for")
    path = resolve_pack(pack)
    dev = pick_device(config.device)
    dtype = parse_dtype(config.dtype, dev)
    with Pack(path) as p:  # fail on a hopeless budget before measuring anything
        shape = ModelShape.from_pack(p, dtype=dtype, device=dev, backend=config.backend,
                                     streams_misses=config.streams_misses)
        context = config.context_for(p.spec.max_position_embeddings)
    plan_budget(config.vram, shape.needs, context=context, sequences=config.batch_size)
    on_cuda = dev.type == "cuda"
    probe = config.to_json() | {"vram": config.vram if on_cuda else None, "batches": 1, "batch_size": 1}
    pm = MoePackModel.load(path, **probe)
    trace = manifest_trace(pm.pack)
    if trace is None and trace_count > 0:
        trace = collect_trace(pm, trace_prompts(pm, trace_count), max_new_tokens=8)
    shape = ModelShape.from_pack(pm.pack, trace=trace, dtype=pm.model.dtype, device=pm.model.device,
                                 backend=config.backend, streams_misses=config.streams_misses)
    # every expert fits the budget: calibrate the engine's overheads (and its overlap) on short runs
    calibrate = (device_tflops is None and not on_cuda
                 and shape.total_experts * shape.expert_bytes + shape.dense_bytes <= config.vram)
    key = machine_key(pm, extra=f"link {link_gbps}, tflops {device_tflops}, mem {mem_gbps}, "
                                f"calibrated {calibrate}")
    hw = None if remeasure else cached_hardware(key)
    if hw is None:
        hw = measure_hardware(pm, link_gbps=link_gbps, device_tflops=device_tflops, mem_gbps=mem_gbps,
                              measure_overlap=not calibrate)
        if calibrate:
            from moepack.runtime.calibrate import calibrate_engine
            from moepack.runtime.throughput import load_for_throughput

            engine = load_for_throughput(pm.pack.path, vram=None, batches=1, device=config.device,
                                         backend=config.backend, context=64, dtype=config.dtype)
            hw = calibrate_engine(engine, shape, hw)
        store_hardware(key, hw)
    else:
        hw = replace(hw, source=hw.source + " (cached; --remeasure to measure again)")
    return choose(shape, hw, config.vram, context=context, prompts=prompts, max_new_tokens=max_new_tokens,
                  batch_size=config.batch_size), pm


def run(pack: str, config, *, link_gbps, device_tflops, mem_gbps, trace_count: int, json_out: bool,
        remeasure: bool = False) -> None:
    err = Console(stderr=True)
    with err.status("measuring", spinner="dots"):
        plan, _ = make_plan(pack, config, link_gbps=link_gbps, device_tflops=device_tflops, mem_gbps=mem_gbps,
                            trace_count=trace_count, remeasure=remeasure)
    if json_out:
        print(json.dumps(plan.to_json() | {"config": config.to_json()}, indent=1))
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
    t = Table(title=f"predicted decode, batches of {best.batch_size} (a step: every sequence +1 token)",
              box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False, collapse_padding=True, title_justify="left")
    for col in ("batches", "slots", "hot", "tok/s", "step", "compute", "transfer", "stall", "loads",
                "MB/tok"):
        t.add_column(col, justify="right", no_wrap=True)
    for p in plan.table:
        mark = "[bold green]" if p is best else ""
        t.add_row(f"{mark}{p.batches}", str(p.slots), str(p.hot), f"{p.tokens_per_s:.2f}", f"{p.step_s * 1e3:.1f}",
                  f"{p.compute_s * 1e3:.1f}", f"{p.transfer_s * 1e3:.1f}", f"{p.stall_s * 1e3:.1f}",
                  f"{p.loads_per_step:.1f}", f"{p.bytes_per_token / 1e6:.2f}")
    console.print(t)
    console.print("[dim]step, compute, transfer, stall: ms per step; loads: expert loads per step[/]")
    size = f" --batch-size {best.batch_size}" if best.batch_size > 1 else ""
    console.print(f"plan: [bold]--batches {best.batches}{size}[/], {best.slots} expert slots "
                  f"({best.hot} hot experts pinned, {best.slots - best.hot} streaming): {plan.reason}", highlight=False)
