"""llama.cpp as a yardstick that other benchmarks call: one checkpoint, one quantisation, one thread count,
measured in its own process (benchmarks/peers/worker.py) on token ids the caller chooses.

    from benchmarks.peers.llama import llama_decode_tokens_per_s, llama_measure
    tps = llama_decode_tokens_per_s(checkpoint, "f16", 1, prompt_ids, 32)  # median decode tokens/s
    row = llama_measure(checkpoint, "Q4_K_M", 2, prompt_ids, 32)          # + ttft_s, peak_rss_bytes, ...

The GGUF files are made once and cached beside the other benchmark files (benchmarks/peers/gguf.py:
llama-cpp-python from the cached wheel, the vendored converter, llama_model_quantize). When llama.cpp cannot
be used, `LlamaUnavailable` says why (no wheel cached, conversion failed, the worker failed); callers report
that instead of a figure."""

from __future__ import annotations

from pathlib import Path

from benchmarks.peers import gguf
from benchmarks.peers.common import run_worker
from moepack.errors import MoepackError

QUANTS = ("f16", *gguf.QUANT_TYPES)


class LlamaUnavailable(MoepackError):
    """llama.cpp could not be prepared or run for a measurement; the message says which step failed."""


def llama_gguf(checkpoint: str | Path, quant: str = "f16") -> Path:
    """The cached GGUF of `checkpoint` at `quant` (f16, Q4_K_M, Q2_K, Q3_K_M, Q8_0), made on first use."""
    if quant not in QUANTS:
        raise LlamaUnavailable(f"unknown llama.cpp quantisation {quant!r}; known: {', '.join(QUANTS)}")
    why = gguf.ensure_llama_cpp()
    if why is not None:
        raise LlamaUnavailable(why, path=checkpoint)
    try:
        f16 = gguf.convert(Path(checkpoint), "f16")
        return f16 if quant == "f16" else gguf.quantize(f16, quant)
    except RuntimeError as exc:
        raise LlamaUnavailable(f"making the {quant} GGUF failed: {exc}", path=checkpoint) from exc


def llama_measure(checkpoint: str | Path, quant: str, threads: int, prompt_ids: list[int], n: int, *,
                  repeats: int = 5, timeout: float = 1800) -> dict:
    """Greedy generation of exactly `n` tokens after `prompt_ids` with llama.cpp on `threads` threads, in a
    fresh process, timed as every peer is timed (benchmarks/peers/worker.py): medians over `repeats` runs
    after one warm-up. Returns the worker's dict: decode_tps, ttft_s, peak_rss_bytes, load_s, tokens, the
    per-run lists, and `gguf` (the file measured)."""
    path = llama_gguf(checkpoint, quant)
    job = {"system": "llamacpp", "path": str(path), "threads": int(threads), "prompt_ids": list(prompt_ids),
           "new_tokens": int(n), "repeats": int(repeats), "label": f"llama.cpp {quant}"}
    out = run_worker(job, timeout=timeout)
    if "error" in out:
        raise LlamaUnavailable(f"the llama.cpp worker failed: {out['error']}", path=path)
    out["gguf"] = str(path)
    return out


def llama_decode_tokens_per_s(checkpoint: str | Path, quant: str, threads: int, prompt_ids: list[int], n: int, *,
                              repeats: int = 5) -> float:
    """Median decode tokens/s of llama.cpp on `checkpoint` at `quant` and `threads` (see `llama_measure`)."""
    return float(llama_measure(checkpoint, quant, threads, prompt_ids, n, repeats=repeats)["decode_tps"])
