"""One measurement in its own process: `python -m benchmarks.peers.worker JOB_JSON` prints one JSON line.

JOB keys: system (moepack | transformers | accelerate | llamacpp), path, threads, repeats, new_tokens,
prompt_ids, ppl_ids (optional), ppl_window, and per system: vram / expert_fraction (moepack), dtype
(transformers), max_memory_bytes + offload_dir (accelerate).

Every system gets the same token ids (the prompt and the perplexity text are tokenised once by the caller
with the checkpoint's tokenizer), generates greedily for exactly `new_tokens` tokens (no early stop at EOS),
and is timed the same way: time to first token = prefill of the prompt + the first greedy pick; decode
tokens/s = (new_tokens - 1) / time of the remaining steps. Medians over `repeats` runs after one warm-up
(moepack and llama.cpp: with `short_warmup`, the warm-up generates 2 tokens after the first 64 prompt ids, enough
to map every expert and build every kernel, for models where a full run takes minutes).
Peak RSS is this process's VmHWM after generation (perplexity runs afterwards and is not counted).
`cpu_s_per_run` (moepack, llama.cpp): median CPU seconds of the process per generation (all its threads), which
a machine shared with other work inflates far less than wall time."""

from __future__ import annotations

import json
import math
import resource
import statistics
import sys
import time


def peak_rss() -> int:
    """This process's own peak RSS: VmHWM of its address space. Not ru_maxrss: Linux carries the parent's
    high-water mark across vfork+exec (Python's subprocess uses vfork), so ru_maxrss of a child spawned by a
    big benchmark process is never below the parent's peak."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def summarise(runs: list[tuple[float, float]], new_tokens: int) -> dict:
    ttft = [r[0] for r in runs]
    tps = [(new_tokens - 1) / r[1] for r in runs if r[1] > 0]
    return {"ttft_s": statistics.median(ttft), "decode_tps": statistics.median(tps), "ttft_runs": ttft,
            "decode_tps_runs": tps}


def nll_from_logits(logits, ids) -> tuple[float, int]:
    """Sum of next-token negative log-likelihoods over a window (numpy, float64), and the prediction count."""
    import numpy as np

    x = np.asarray(logits[:-1], dtype=np.float64)
    target = np.asarray(ids[1:], dtype=np.int64)
    m = x.max(axis=1, keepdims=True)
    lse = np.log(np.exp(x - m).sum(axis=1)) + m[:, 0]
    return float((lse - x[np.arange(len(target)), target]).sum()), len(target)


def perplexity(window_logits, ppl_ids: list[int], window: int) -> float:
    """exp(mean NLL) over non-overlapping windows; `window_logits(ids) -> [len(ids), V]`."""
    total, count = 0.0, 0
    for i in range(0, len(ppl_ids) - 1, window):
        ids = ppl_ids[i:i + window]
        if len(ids) < 2:
            break
        s, n = nll_from_logits(window_logits(ids), ids)
        total, count = total + s, count + n
    return math.exp(total / count)


# --- moepack ------------------------------------------------------------------------------------------
def moepack_budget(path: str, fraction: float, context: int) -> int:
    """The --vram (bytes) that leaves exactly ceil(fraction * experts) expert slots after the dense weights,
    the KV cache for `context` tokens and the workspace, as the runtime itself plans them on the CPU."""
    from moepack.runtime.api import MoePackModel

    probe = MoePackModel.load(path, vram="1TB", device="cpu", context=context)
    slots = max(probe.spec.top_k, math.ceil(fraction * len(probe.pack.manifest.experts)))
    return probe.budget.vram_for(slots)


def run_moepack(job: dict) -> dict:
    from moepack.runtime.api import MoePackModel

    context = job.get("context", 512)
    vram = job.get("vram")
    if vram is None and job.get("expert_fraction") is not None:
        vram = moepack_budget(job["path"], job["expert_fraction"], context)
    t0 = time.perf_counter()
    model = MoePackModel.load(job["path"], vram=vram, device="cpu", context=context,
                              backend=job.get("backend", "auto"))
    load_s = time.perf_counter() - t0
    prompt, n = job["prompt_ids"], job["new_tokens"]
    if job.get("profile"):  # decode (8 prompt ids, n tokens) and prefill (the whole prompt, 2 tokens)
        model.generate(prompt[:64], max_new_tokens=2, stop_at_eos=False)
        prof = {"decode": profile_generate(model, prompt[:8], n), "prefill": profile_generate(model, prompt, 2)}
        return {"profile": prof, "load_s": load_s, "peak_rss_bytes": peak_rss()}
    if job.get("short_warmup"):
        model.generate(prompt[:64], max_new_tokens=2, stop_at_eos=False)
    runs, moved, hits, host, cpu = [], [], [], [], []
    for r in range(job["repeats"] + int(not job.get("short_warmup"))):
        c0 = time.process_time()
        g = model.generate(prompt, max_new_tokens=n, stop_at_eos=False)
        if r or job.get("short_warmup"):  # else the first run is the warm-up
            cpu.append(time.process_time() - c0)
            runs.append((g.stats.ttft_s, g.stats.decode_s))
            moved.append(g.stats.bytes_moved_per_token)
            hits.append(g.stats.cache_hit_rate)
            host.append(g.stats.host_overhead_s_per_layer or 0.0)
    out = summarise(runs, n)
    out.update(load_s=load_s, peak_rss_bytes=peak_rss(), vram_bytes=vram,
               bytes_moved_per_token=statistics.median(moved), cache_hit_rate=statistics.median(hits),
               host_overhead_s_per_layer=statistics.median(host), cpu_s_per_run=statistics.median(cpu),
               expert_slots=model.budget.slots if model.budget else None,
               total_experts=len(model.pack.manifest.experts), backend=model.executor.backend.name,
               tokens=g.tokens)
    try:  # the ISA the compiled CPU kernels dispatched to (for the record; absent when they did not load)
        import torch

        from moepack.kernels.compiled import quant_gemm

        out["kernel"] = (f"{out['backend']}, ISA {torch.ops.moepack_cpu.isa()}, quantised products of more than "
                         f"8 tokens in {quant_gemm()[1]}")
    except (AttributeError, RuntimeError):
        pass
    if job.get("ppl_ids"):
        out["ppl"] = perplexity(lambda ids: model.logits(ids).numpy(), job["ppl_ids"], job.get("ppl_window", 256))
    return out


def profile_generate(model, prompt: list[int], n: int, top: int = 10) -> list[list]:
    """One generation under the torch profiler (the model warmed up): the `top` operators by self CPU time, as
    [name, self CPU ms, calls, share of the wall time]. Python-side time between operators shows as the gap
    between the operators' total and the wall time (first row)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        g = model.generate(prompt, max_new_tokens=n, stop_at_eos=False)
    wall = g.stats.ttft_s + g.stats.decode_s  # the generation itself, without the profiler's start and stop
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) / 1e3
    rows = [["(the generation's wall time; all operators)", f"{wall * 1e3:.1f} ({total:.1f})", "", "100%"]]
    rows += [[e.key[:60], f"{e.self_cpu_time_total / 1e3:.1f}", e.count,
              f"{e.self_cpu_time_total / 1e3 / (wall * 1e3):.0%}"] for e in events[:top]]
    return rows


# --- transformers (whole, or offloaded with accelerate) ------------------------------------------------
def run_transformers(job: dict, offload: bool) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, job.get("dtype", "bfloat16"))
    kwargs: dict = {"dtype": dtype}
    if offload:
        kwargs.update(device_map="auto", max_memory={"cpu": int(job["max_memory_bytes"])},
                      offload_folder=job["offload_dir"], offload_state_dict=True)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(job["path"], **kwargs).eval()
    load_s = time.perf_counter() - t0
    placement: dict = {}
    for dev in getattr(model, "hf_device_map", {}).values():
        placement[str(dev)] = placement.get(str(dev), 0) + 1
    prompt, n = torch.tensor([job["prompt_ids"]]), job["new_tokens"]

    @torch.inference_mode()
    def once() -> tuple[float, float, list[int]]:
        t0 = time.perf_counter()
        out = model(input_ids=prompt, use_cache=True)
        tok = int(out.logits[0, -1].argmax())
        ttft = time.perf_counter() - t0
        toks, past = [tok], out.past_key_values
        t1 = time.perf_counter()
        for _ in range(n - 1):
            out = model(input_ids=torch.tensor([[tok]]), past_key_values=past, use_cache=True)
            past, tok = out.past_key_values, int(out.logits[0, -1].argmax())
            toks.append(tok)
        return ttft, time.perf_counter() - t1, toks

    runs = []
    for r in range(job["repeats"] + 1):
        ttft, dec, toks = once()
        if r:
            runs.append((ttft, dec))
    out = summarise(runs, n)
    out.update(load_s=load_s, peak_rss_bytes=peak_rss(), placement=placement, tokens=toks)
    if job.get("ppl_ids"):
        @torch.inference_mode()
        def window_logits(ids):
            return model(input_ids=torch.tensor([ids])).logits[0].float().numpy()

        out["ppl"] = perplexity(window_logits, job["ppl_ids"], job.get("ppl_window", 256))
    return out


# --- llama.cpp (llama-cpp-python) ---------------------------------------------------------------------
def run_llamacpp(job: dict) -> dict:
    import numpy as np

    try:
        from llama_cpp import Llama
    except ImportError:
        from benchmarks.peers.gguf import activate_built

        activate_built()
        from llama_cpp import Llama

    threads, n = job["threads"], job["new_tokens"]
    prompt = job["prompt_ids"]
    t0 = time.perf_counter()
    llm = Llama(model_path=job["path"], n_ctx=len(prompt) + n + 8, n_threads=threads, n_threads_batch=threads,
                n_gpu_layers=0, logits_all=False, verbose=False, seed=0)
    load_s = time.perf_counter() - t0

    n_vocab = llm.n_vocab()

    def last_logits():
        # with logits_all=False, llama-cpp-python no longer copies logits into .scores: read the context's row
        return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))

    def once(prompt: list[int] = prompt, n: int = n) -> tuple[float, float, list[int]]:
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        tok = int(np.argmax(last_logits()))
        ttft = time.perf_counter() - t0
        toks = [tok]
        t1 = time.perf_counter()
        for _ in range(n - 1):
            llm.eval([tok])
            tok = int(np.argmax(last_logits()))
            toks.append(tok)
        return ttft, time.perf_counter() - t1, toks

    runs, cpu = [], []
    if job.get("short_warmup"):
        once(prompt[:64], 2)
    for r in range(job["repeats"] + int(not job.get("short_warmup"))):
        c0 = time.process_time()
        ttft, dec, toks = once()
        if r or job.get("short_warmup"):  # else the first run is the warm-up
            runs.append((ttft, dec))
            cpu.append(time.process_time() - c0)
    out = summarise(runs, n)
    out.update(load_s=load_s, peak_rss_bytes=peak_rss(), tokens=toks, cpu_s_per_run=statistics.median(cpu))
    try:
        import llama_cpp

        out["system_info"] = llama_cpp.llama_print_system_info().decode(errors="replace")
    except (AttributeError, OSError):  # an older binding without it: the section just lacks the line
        pass
    if job.get("ppl_ids"):
        window = job.get("ppl_window", 256)
        del llm
        full = Llama(model_path=job["path"], n_ctx=window, n_batch=window, n_ubatch=window, n_threads=threads,
                     n_threads_batch=threads, n_gpu_layers=0, logits_all=True, verbose=False)

        def window_logits(ids):
            full.reset()
            full.eval(ids)
            return np.array(full.scores[:len(ids)])

        out["ppl"] = perplexity(window_logits, job["ppl_ids"], window)
    return out


def main() -> None:
    job = json.loads(sys.argv[1])
    threads = int(job.get("threads", 1))
    system = job["system"]
    torch_threads = None
    if system != "llamacpp":  # llama.cpp's process stays free of torch (its peak RSS is llama.cpp's own)
        import torch

        torch.set_num_threads(threads)
        torch_threads = torch.get_num_threads()
    if system == "moepack":
        out = run_moepack(job)
    elif system in ("transformers", "accelerate"):
        out = run_transformers(job, offload=system == "accelerate")
    elif system == "llamacpp":
        out = run_llamacpp(job)
    else:
        raise SystemExit(f"unknown system {system!r}")
    out.update(system=system, label=job.get("label", system), threads=threads, torch_threads=torch_threads)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
