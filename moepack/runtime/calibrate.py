"""Measuring this machine for the throughput planner (runtime/planner.py): link bandwidth, expert and dense
compute curves through the runtime itself, copy/compute overlap, and the engine calibration. The figures
are cached per machine and pack (`hardware_for`), so `moepack plan` measures once."""

from __future__ import annotations

import contextlib
import math
import statistics
import threading
import time

import torch

from moepack.runtime.planner import Hardware, ModelShape, predict


# --- measuring this machine ---------------------------------------------------------------------------------
def _median(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_link(pack, device: torch.device, *, experts: int = 32, repeats: int = 3) -> float:
    """GB/s of expert blobs moved from the mapped pack into a slot by the runtime's streamer (CPU: one copy
    from the mapped pages, which are then dropped; CUDA: pinned staging + host-to-device copy), cycling
    through up to `experts` experts so that the pages are as cold as in a real run."""
    from moepack.runtime.streamer import Streamer

    keys = list(pack.expert_records)[:: max(1, len(pack.expert_records) // experts)][:experts]
    nbytes = max(pack.expert_records[k].nbytes for k in keys)
    streamer = Streamer(pack, device, nbytes, verify=False)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)

    def once() -> None:
        for k in keys:
            streamer.load(k, dst[: pack.expert_records[k].nbytes])
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    once()
    moved = sum(pack.expert_records[k].nbytes for k in keys)
    return moved / _median(once, repeats) / 1e9


def measure_hardware(pm, *, link_gbps: float | None = None, device_tflops: float | None = None,
                     mem_gbps: float | None = None, repeats: int = 9, measure_overlap: bool = True) -> Hardware:
    """Measure (or take) the hardware numbers for a loaded MoePackModel `pm`. `measure_overlap=False` skips the
    copy/compute overlap microbenchmark (taken as 1) when `calibrate_engine` will fit the overlap instead."""
    model, pack, spec = pm.model, pm.pack, pm.spec
    dev = model.device
    key = next(iter(pack.expert_records))
    blob = pack.expert_blob(*key).to(dev)
    projs = pm.executor._projections(key, blob)
    backend = pm.executor.backend
    sources = []
    if link_gbps is None:
        link_gbps = measure_link(pack, dev)
        sources.append("link measured")
    h, i = spec.hidden_size, spec.moe_intermediate_size
    expert_curve: tuple = ()
    dense_curve: tuple = ()
    if device_tflops is not None:
        flops = device_tflops * 1e12
        token = 6 * h * i / flops
        fixed = pack.expert_records[key].nbytes / (mem_gbps * 1e9) if mem_gbps else 0.0
        dense_params = sum(math.prod(t.shape) for t in pack.manifest.tensors) / max(1, spec.num_layers)
        dense_token, head_token = 2 * dense_params / flops, 2 * h * spec.vocab_size / flops
        dense_fixed = 0.0
        sources.append("compute from --device-tflops")
    else:
        expert_curve = _measure_expert_curve(pm, repeats)
        head_token = _measure_head(pm, repeats)
        dense_curve = _measure_dense_curve(pm, repeats, head_token)
        fixed, token = _linear_fit(expert_curve)  # the 1- and 8-token points, for displays and on-paper use
        dense_fixed, dense_token = _linear_fit(dense_curve)
        sources.append("compute measured")
    overlap = _measure_overlap(pm, projs, backend) if measure_overlap and dev.type != "cuda" else 1.0
    return Hardware(link_gbps=link_gbps, expert_fixed_s=fixed, expert_token_s=token, dense_token_s=dense_token,
                    head_token_s=head_token, overlap=overlap, dense_fixed_s=dense_fixed, source=", ".join(sources),
                    expert_curve=expert_curve, dense_curve=dense_curve)


ENGINE_SEQS = (1, 4, 16, 32)
STREAMING_SEQS = (1, 8, 32)


def _bisect(predicted, measured: float, lo: float, hi: float, *, falling: bool) -> float:
    """x in [lo, hi] where the monotonic `predicted(x)` meets `measured` (clamped to the ends)."""
    for _ in range(24):
        mid = (lo + hi) / 2
        above = predicted(mid) > measured
        lo, hi = (mid, hi) if above == falling else (lo, mid)
    return (lo + hi) / 2


def calibrate_engine(pm, shape: ModelShape, hw: Hardware, *, seqs: tuple[int, ...] = ENGINE_SEQS,
                     new_tokens: int = 6, prompt_tokens: int = 4,
                     streaming_seqs: tuple[int, ...] = STREAMING_SEQS, repeats: int = 5) -> Hardware:
    """Hardware fitted to short runs (each timed `repeats` times, the median kept: one run on a shared
    machine can be off by tens of percent) of the runtime itself (docs/planning.md, "Calibration"):

    * `engine_scale`: with every expert resident in `pm`'s cache (only compute counts), measured / modelled
      run time of the multi-batch engine for each number of sequences in `seqs`;
    * `overlap_curve`: with a small cache (an eighth of the experts), for each number of sequences in
      `streaming_seqs`, the overlap whose predicted run time matches the measured one (a copy thread beside
      compute contends for memory and cores in ways the microbenchmark behind `measure_hardware`'s overlap
      does not see, and how much of a copy hides depends on how much compute a step has);
    * `plain_scale`: measured / modelled run time of the plain runtime (one sequence, synchronous loads) on
      the same small cache.
    The small cache is not a budget the planner is asked about in the benchmarks; every configuration it
    predicts there is out of sample."""
    from dataclasses import replace

    from moepack.runtime.throughput import generate_many, load_for_throughput

    cache = pm.executor.cache
    if cache is None or cache.slots < shape.total_experts:
        return replace(hw, source=hw.source + ", engine uncalibrated (needs every expert resident)")
    g = torch.Generator().manual_seed(0)

    def prompts(n: int) -> list[list[int]]:
        return [torch.randint(0, pm.spec.vocab_size, (prompt_tokens,), generator=g).tolist() for _ in range(n)]

    def timed(model, batch: list[list[int]]) -> float:
        generate_many(model, batch[:1], batches=1, max_new_tokens=2, prefetch=False, stop_at_eos=False)  # warm
        return _median(lambda: generate_many(model, batch, batches=len(batch), max_new_tokens=new_tokens,
                                             prefetch=False, stop_at_eos=False), repeats)

    def timed_plain(model, batch: list[list[int]]) -> float:
        model.generate(batch[0], max_new_tokens=2, stop_at_eos=False)  # warm
        return _median(lambda: [model.generate(p, max_new_tokens=new_tokens, stop_at_eos=False) for p in batch],
                       repeats)

    def modelled(h: Hardware, n: int, slots: int) -> float:
        return predict(shape, h, batches=n, slots=slots, prompts=[prompt_tokens] * n,
                       max_new_tokens=new_tokens).run_s

    def modelled_plain(h: Hardware, n: int, slots: int) -> float:  # n prompts one after another
        return predict(shape, h, batches=1, slots=slots, prompts=[prompt_tokens] * n, max_new_tokens=new_tokens,
                       pipelined=False, engine=False).run_s

    scale = tuple((n, float(timed(pm, prompts(n)) / modelled(hw, n, shape.total_experts))) for n in seqs)
    hw = replace(hw, engine_scale=scale)
    slots = max(2 * shape.top_k, shape.total_experts // 8)
    small = load_for_throughput(pm.pack.path, vram=None, batches=1, slots=slots, context=pm.context,
                                device=str(pm.model.device), dtype=pm.model.dtype)
    curve = []
    for n in streaming_seqs:  # the predicted time falls as overlap rises
        measured = timed(small, prompts(n))
        curve.append((n, _bisect(lambda o, n=n: modelled(replace(hw, overlap=o), n, slots), measured, 0.0, 1.0,
                                 falling=True)))
    batch = prompts(4)
    measured = timed_plain(small, batch)
    plain = _bisect(lambda f: modelled_plain(replace(hw, plain_scale=f), len(batch), slots), measured, 0.1, 10.0,
                    falling=False)
    return replace(hw, overlap=statistics.median(o for _, o in curve), overlap_curve=tuple(curve),
                   plain_scale=float(plain), source=hw.source + ", engine calibrated")


class _ZeroExperts:
    def forward(self, layer, x, topk_ids, topk_weights):
        return torch.zeros_like(x)


@contextlib.contextmanager
def _experts_stubbed(model):
    """The model with its experts replaced by zeros: what is left is the dense parts."""
    saved, model.executor = model.executor, _ZeroExperts()
    try:
        yield model
    finally:
        model.executor = saved


def _measure_head(pm, repeats: int) -> float:
    """Seconds of one token's lm_head product and argmax."""
    model = pm.model
    h = torch.randn(1, model.spec.hidden_size, dtype=model.dtype, device=model.device)
    return _median(lambda: int(model.linear(h, model.lm_head).argmax()), repeats)


def _lower_envelope(curve: list[tuple[int, float]]) -> tuple[tuple[int, float], ...]:
    """A cost curve made non-decreasing from below: each point is the smallest time measured at or beyond its
    token count. More tokens never cost less, and interference on a shared machine only adds time, so a point
    above a later one is the noisy one (the median of a few repeats still catches a burst)."""
    out, low = [], math.inf
    for n, t in reversed(sorted(curve)):
        low = min(low, t)
        out.append((n, low))
    return tuple(reversed(out))


def _linear_fit(curve: tuple[tuple[int, float], ...]) -> tuple[float, float]:
    """(fixed, per token) through a curve's 1- and 8-token points."""
    at = dict(curve)
    token = max(0.0, (at[8] - at[1]) / 7)
    return max(0.0, at[1] - token), token


CURVE_TOKENS = (1, 2, 4, 8, 16, 32, 64)


def _measure_expert_curve(pm, repeats: int, points: tuple[int, ...] = CURVE_TOKENS) -> tuple:
    """((n, seconds of one expert call with n tokens), ...) through the runtime's executor (routing, kernels,
    gathering and summing included): n tokens routed to k experts of every sparse layer in turn, other
    experts in each layer, so the weights come from memory as in a real decode rather than from a warm cache."""
    spec, dev, ex = pm.spec, pm.model.device, pm.executor
    layers, k, e = list(spec.sparse_layer_ids), spec.top_k, spec.num_experts
    out = []
    for n in points:
        x = torch.randn(n, spec.hidden_size, device=dev, dtype=pm.model.dtype)
        w = torch.full((n, k), 1.0 / k, device=dev, dtype=pm.model.dtype)
        routes = [torch.tensor([(r * k + j) % e for j in range(k)], device=dev).expand(n, k).contiguous()
                  for r in range(max(1, e // k))]

        def sweep(x=x, w=w, routes=routes) -> None:
            for i, layer in enumerate(layers):
                ex.forward(layer, x, routes[i % len(routes)], w)

        sweep()  # warm (and resident, under a budget)
        out.append((n, _median(sweep, repeats) / (len(layers) * k)))
    ex.reset_counters()
    return _lower_envelope(out)


def _measure_dense_curve(pm, repeats: int, head_s: float, points: tuple[int, ...] = CURVE_TOKENS) -> tuple:
    """((n, seconds of one layer's dense parts for n new tokens), ...): a forward with the experts stubbed out,
    the last position's head taken off, divided by the layers."""
    out = []
    with _experts_stubbed(pm.model) as model:
        cache = model.new_cache(capacity=64 + max(points))
        model.forward(torch.arange(2, 34) % model.spec.vocab_size, cache)
        for n in points:
            ids = torch.arange(3, 3 + n) % model.spec.vocab_size

            def step(ids=ids) -> None:
                model.forward(ids, cache, last_only=True)
                cache.crop(32)

            step()
            out.append((n, max(0.0, _median(step, repeats) - head_s) / model.spec.num_layers))
    return _lower_envelope(out)


def _measure_overlap(pm, projs, backend, seconds: float = 0.3) -> float:
    """Share of the shorter of (expert compute, expert copy) that hides under the other when a copy thread
    runs beside compute on this machine (1: perfect overlap, 0: they serialise)."""
    from moepack.runtime.executor import expert_ffn

    pack = pm.pack
    keys = list(pack.expert_records)
    nbytes = max(pack.expert_records[k].nbytes for k in keys)
    dst = torch.empty(nbytes, dtype=torch.uint8)
    x = torch.randn(1, pm.spec.hidden_size)

    def copies(n: int) -> None:
        for j in range(n):
            k = keys[j % len(keys)]
            src = pack.expert_blob(*k)
            dst[: src.numel()].copy_(src)
            pack.release(*k)

    def computes(n: int) -> None:
        for _ in range(n):
            expert_ffn(x, projs, backend)

    t_c1 = _median(lambda: computes(1), 3)
    t_x1 = _median(lambda: copies(1), 3)
    nc = max(1, int(seconds / max(t_c1, 1e-6)))
    nx = max(1, int(seconds / max(t_x1, 1e-6)))
    t_c = _median(lambda: computes(nc), 1)
    t_x = _median(lambda: copies(nx), 1)
    worker = threading.Thread(target=copies, args=(nx,))
    t0 = time.perf_counter()
    worker.start()
    computes(nc)
    worker.join()
    both = time.perf_counter() - t0
    return float(min(1.0, max(0.0, (t_c + t_x - both) / max(min(t_c, t_x), 1e-9))))


# --- the per-machine cache ---------------------------------------------------------------------------------
def machine_key(pm, *, extra: str = "") -> str:
    """What the measurements depend on: the CPU (or GPU) model, threads, torch, the pack's manifest, the compute
    dtype and kernels, and how they were taken (`extra`)."""
    import hashlib
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), cpu)
    except OSError:
        pass
    dev = pm.model.device
    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"{cpu}, {torch.get_num_threads()} threads"
    manifest = hashlib.sha256((pm.pack.path / "manifest.json").read_bytes()).hexdigest()[:16]
    return (f"{where} | torch {torch.__version__} | {manifest} | {pm.model.dtype} | "
            f"{pm.executor.backend.name} | {extra}")


def _cache_file():
    from moepack.source.resolve import pack_store

    return pack_store().parent / "hardware.json"


def cached_hardware(key: str) -> Hardware | None:
    """The measurements stored under `key`, if any (an unreadable cache is ignored: it only saves time)."""
    import json

    try:
        entry = json.loads(_cache_file().read_text()).get(key)
        return None if entry is None else Hardware(**{
            k: (tuple(tuple(p) for p in v) if isinstance(v, list) else v) for k, v in entry.items()})
    except (OSError, ValueError, TypeError):
        return None


def store_hardware(key: str, hw: Hardware) -> None:
    """Keep `hw` under `key` (written to a temporary name, then renamed: a reader never sees half a file)."""
    import json
    import os

    path = _cache_file()
    try:
        data = json.loads(path.read_text()) if path.exists() else {}
    except (OSError, ValueError):
        data = {}
    data[key] = hw.to_json()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, path)
    except OSError:
        pass  # a cache that cannot be written only costs the next plan a measurement
