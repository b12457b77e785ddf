"""Time the CPP kernels against this machine's copy bandwidth and the TORCH reference; write the
"kernels" section of docs/benchmarks.md.

    python -m benchmarks.bench_kernels [--shapes 4096x1024,8192x2048] [--bits 4,2] [--group 64]
                                       [--threads 1,2] [--repeats 20] [--device cpu|cuda] [--no-write]

Always measured, at each thread count, on a Mixtral expert matrix (14336 x 4096, q4g128, the target of
the section's summary line):
  * copy bandwidth: a 256 MiB torch copy, (bytes read + bytes written) / s, alternating with the GEMV runs,
    best of each (a shared machine disturbs some runs; the bests compare like with like);
  * GEMV (one token) through every CPU code path this machine runs (best first; int8 activations where
    the path has an integer GEMV; on the best path also one plane and the exact fp32 kernels), in GB/s of packed bytes
    (codes + scales + zeros) and as a share of the copy bandwidth;
  * matmul_t (h @ W, the down projection's form), few tokens (2, 4, 8: fused) and many (64, 512:
    dequantised tiles through torch's GEMM), per call and per token.
Then, for each --shapes entry and bit width, the TORCH reference against CPP (the older table).
With --device cuda the CUDA kernels are timed instead (CUDA events), or the run stops with the reason.
The machine's cores may be shared: compare numbers from the same run only.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from benchmarks.report import markdown_table, median_time, update_section
from moepack.codecs import as_recipe
from moepack.kernels import Backend, compiled, matmul, matmul_t
from moepack.kernels._build import CPP

HEAD_SHAPE, HEAD_RECIPE = (14336, 4096), "q4g128"


def paired(fn, repeats: int, nbytes: int = 256 << 20) -> dict:
    """A copy of `nbytes` and a call of `fn` alternating `repeats` times, so both see the same load on shared
    cores. Returns the best and median wall seconds of `fn`, its best thread CPU seconds, and the copy's best
    GB/s by wall time and by thread CPU time. CPU time leaves out the time the thread was not running (other
    processes on the same cores), which is what it measures only with one thread (then the calls run in the
    calling thread)."""
    src = torch.empty(nbytes, dtype=torch.uint8).fill_(1)
    dst = torch.empty_like(src).fill_(0)
    dst.copy_(src)
    fn()
    copy_wall, copy_cpu, wall, cpu = [], [], [], []
    for _ in range(repeats):
        for f, w_list, c_list in ((lambda: dst.copy_(src), copy_wall, copy_cpu), (fn, wall, cpu)):
            c0, w0 = time.thread_time(), time.perf_counter()
            f()
            w_list.append(time.perf_counter() - w0)
            c_list.append(time.thread_time() - c0)
    wall.sort()
    return {"best": wall[0], "median": wall[len(wall) // 2], "cpu": min(cpu),
            "copy": 2 * nbytes / min(copy_wall) / 1e9, "copy_cpu": 2 * nbytes / min(copy_cpu) / 1e9}


def random_parts(rows: int, cols: int, bits: int, group: int, seed: int = 0, device: str = "cpu"):
    g = torch.Generator().manual_seed(seed)
    parts = {
        "codes": torch.randint(0, 256, (rows, cols * bits // 8), generator=g, dtype=torch.uint8),
        "scale": (torch.rand(rows, cols // group, generator=g) * 0.01 + 1e-4).half(),
        "zero": (torch.rand(rows, cols // group, generator=g) * (2**bits - 1)).half(),
    }
    return {k: v.to(device) for k, v in parts.items()}


def packed_bytes(parts) -> int:
    return sum(p.numel() * p.element_size() for p in parts.values())


def headline(threads: int, repeats: int) -> dict:
    """The 14336x4096 q4g128 measurements at `threads` threads."""
    torch.set_num_threads(threads)
    ops = CPP.load()
    rows, cols = HEAD_SHAPE
    r = as_recipe(HEAD_RECIPE)
    parts = random_parts(rows, cols, r.bits, r.group)
    packed = packed_bytes(parts)
    x, h = torch.randn(1, cols), torch.randn(1, rows)
    best, q8_before = ops.isa(), ops.set_q8(2)
    paths = []
    try:
        for isa in ops.isas():
            ops.set_isa(isa)
            for q8 in ((2, 1, 0) if isa == best else (2,)):
                ops.set_q8(q8)
                m = paired(lambda: matmul(x, parts, r, HEAD_SHAPE, backend=Backend.CPP), repeats)
                paths.append({"isa": isa, "planes": int(ops.q8()), **m})
        ops.set_isa(best)
        ops.set_q8(2)
        mt = paired(lambda: matmul_t(h, parts, r, HEAD_SHAPE, backend=Backend.CPP), repeats)
        tokens = []
        for T in (2, 4, 8, 64, 512):
            xt = torch.randn(T, cols)
            reps = repeats if T <= compiled.FUSED_MAX_T else 3
            t = median_time(lambda xt=xt: matmul(xt, parts, r, HEAD_SHAPE, backend=Backend.CPP), repeats=reps)[0]
            tokens.append((T, t))
    finally:
        ops.set_isa(best)
        ops.set_q8(q8_before)
    return {"threads": threads, "packed": packed, "paths": paths, "matmul_t": mt, "tokens": tokens}


def bench_one(rows: int, cols: int, recipe: str, repeats: int, torch_repeats: int) -> tuple:
    """(packed bytes, TORCH matmul s, CPP matmul s, CPP matmul_t s, dense fp32 GEMV s)."""
    r, shape = as_recipe(recipe), (rows, cols)
    parts = random_parts(rows, cols, r.bits, r.group)
    x, h = torch.randn(1, cols), torch.randn(1, rows)
    dense = compiled.dequantize(CPP, parts, r, cols, None, "cpu")  # [rows, cols] fp32
    t_ref = median_time(lambda: matmul(x, parts, r, shape, backend=Backend.TORCH), repeats=torch_repeats)[0]
    t_mm = median_time(lambda: matmul(x, parts, r, shape, backend=Backend.CPP), repeats=repeats)[0]
    t_mt = median_time(lambda: matmul_t(h, parts, r, shape, backend=Backend.CPP), repeats=repeats)[0]
    t_fp = median_time(lambda: x @ dense.T, repeats=repeats)[0]
    return packed_bytes(parts), t_ref, t_mm, t_mt, t_fp


def _basis(threads: int, m: dict) -> tuple[float, float]:
    """(seconds of a call, copy GB/s) on the basis the summary uses: thread CPU time at one thread, else wall."""
    return (m["cpu"], m["copy_cpu"]) if threads == 1 else (m["best"], m["copy"])


def render(heads: list[dict], shape_rows: list[tuple], args) -> str:
    out = [f"Output of `python -m benchmarks.bench_kernels --threads {args.threads}` (see the module's docstring). "
           "GB/s counts packed bytes (codes, scales, zeros); copy is a 256 MiB torch copy, (read + written) / s, "
           "alternating with the GEMV runs. The cores are shared with other work, so each figure is the best of "
           "its runs, and at one thread both the GEMV and the copy are timed by thread CPU time (time the thread "
           "ran); at two threads by wall time. Wall medians are beside them.", ""]
    for hd in heads:
        n = hd["threads"]
        t, copy = _basis(n, hd["paths"][0])
        pct = 100 * hd["packed"] / t / 1e9 / copy
        out.append(f"GEMV 14336x4096 q4 at {n} thread{'s' if n > 1 else ''}: {pct:.0f}% of copy bandwidth")
    out.append("")
    rows = []
    for hd in heads:
        for p in hd["paths"]:
            t, copy = _basis(hd["threads"], p)
            gbs = hd["packed"] / t / 1e9
            rows.append([hd["threads"], p["isa"], ("fp32", "int8", "int8 x2")[p["planes"]], f"{p['best'] * 1e3:.2f}",
                         f"{p['median'] * 1e3:.2f}", f"{p['cpu'] * 1e3:.2f}" if hd["threads"] == 1 else "-",
                         f"{gbs:.1f}", f"{copy:.1f}", f"{100 * gbs / copy:.0f}%"])
    out += ["GEMV (one token) on 14336x4096 q4g128 through each CPU code path. Activations: int8 x2 (the "
            "default: two int8 planes per block of 32, about 15 bits), int8 (one plane, as llama.cpp's q8), or "
            "fp32 (the exact kernels, MOEPACK_CPU_Q8=0). GB/s and copy on the summary's basis:", "",
            markdown_table(["threads", "path", "activations", "best ms", "median ms", "CPU ms", "GB/s",
                            "copy GB/s", "of copy"], rows)]
    rows = []
    for hd in heads:
        n = hd["threads"]
        gemv = _basis(n, hd["paths"][0])[0]
        t_mt = _basis(n, hd["matmul_t"])[0]
        rows.append([n, "matmul_t (h @ W), 1", f"{t_mt * 1e3:.2f}", f"{t_mt * 1e3:.2f}",
                     f"{hd['packed'] / t_mt / 1e9:.1f}", f"{gemv / t_mt:.2f}x"])
        gemv = hd["paths"][0]["median"]
        for T, t in hd["tokens"]:
            rows.append([n, f"matmul, {T}", f"{t * 1e3:.2f}", f"{t * 1e3 / T:.3f}",
                         f"{hd['packed'] / t / 1e9:.1f}", f"{gemv * T / t:.2f}x"])
    out += ["Other forms on the same matrix (best path): matmul_t (timed as the GEMV above), few tokens (fused, up "
            f"to {compiled.FUSED_MAX_T}) and many (dequantised tiles and torch's GEMM; wall medians); 'vs GEMV' is "
            "the throughput (tokens/s, or rows for matmul_t) against the one-token GEMV on the same basis:", "",
            markdown_table(["threads", "op, tokens", "ms per call", "ms per token", "GB/s", "vs GEMV"], rows)]
    if shape_rows:
        rows = [[s, rec, th, f"{pk / 1e6:.1f}", f"{tr * 1e3:.1f}", f"{tm * 1e3:.2f}", f"{tr / tm:.0f}x",
                 f"{pk / tm / 1e9:.2f}", f"{tt * 1e3:.2f}", f"{pk / tt / 1e9:.2f}", f"{tf * 1e3:.2f}"]
                for s, rec, th, pk, tr, tm, tt, tf in shape_rows]
        out += ["Smaller matrices, one token, against the TORCH reference (decode, then multiply) and a dense "
                "fp32 GEMV on the decoded matrix:", "",
                markdown_table(["shape", "recipe", "threads", "packed MB", "TORCH ms", "CPP ms", "speedup",
                                "CPP GB/s", "matmul_t ms", "matmul_t GB/s", "dense fp32 ms"], rows)]
    return "\n".join(out)


def bench_cuda(args) -> None:
    """CUDA kernels on the headline matrix (CUDA events), against a device-to-device copy."""
    from moepack.kernels._build import CUDA

    if not CUDA.available():
        raise SystemExit(f"CUDA kernels unavailable: {CUDA._error or CUDA.disabled_reason()}")
    rows, cols = HEAD_SHAPE
    r = as_recipe(HEAD_RECIPE)
    parts = random_parts(rows, cols, r.bits, r.group, device="cuda")
    packed = packed_bytes(parts)

    def cuda_time(fn) -> float:
        fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(args.repeats):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3 / args.repeats

    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    copy = 2 * src.numel() / cuda_time(lambda: dst.copy_(src)) / 1e9
    print(f"CUDA {torch.cuda.get_device_name()}: copy {copy:.0f} GB/s")
    for T in (1, 4, 8, 64, 512):
        x = torch.randn(T, cols, device="cuda")
        t = cuda_time(lambda x=x: matmul(x, parts, r, HEAD_SHAPE, backend=Backend.CUDA))
        print(f"  matmul T={T}: {t * 1e6:.0f} us, {packed / t / 1e9:.0f} GB/s ({100 * packed / t / 1e9 / copy:.0f}%)")
    h = torch.randn(1, rows, device="cuda")
    t = cuda_time(lambda: matmul_t(h, parts, r, HEAD_SHAPE, backend=Backend.CUDA))
    print(f"  matmul_t T=1: {t * 1e6:.0f} us, {packed / t / 1e9:.0f} GB/s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="4096x1024,8192x2048")
    ap.add_argument("--bits", default="4,2")
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--torch-repeats", type=int, default=3, help="repeats of the (slow) TORCH reference")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--no-write", action="store_true", help="print the section instead of writing it")
    args = ap.parse_args()
    if args.device == "cuda":
        bench_cuda(args)
        return
    if not CPP.available():
        raise SystemExit(f"C++ kernels unavailable: {CPP._error or CPP.disabled_reason()}")
    threads = [int(t) for t in args.threads.split(",")]
    heads, shape_rows = [], []
    for n in threads:
        heads.append(headline(n, args.repeats))
        best = heads[-1]["paths"][0]
        t, copy = _basis(n, best)
        print(f"# {n} thread(s): GEMV {t * 1e3:.2f} ms, {heads[-1]['packed'] / t / 1e9:.1f} GB/s, copy {copy:.1f} GB/s",
              flush=True)
    for n in threads:
        torch.set_num_threads(n)
        for shape_s in filter(None, args.shapes.split(",")):
            rows, cols = (int(v) for v in shape_s.lower().split("x"))
            for bits in (int(b) for b in args.bits.split(",")):
                recipe = f"q{bits}g{args.group}"
                shape_rows.append((shape_s, recipe, n, *bench_one(rows, cols, recipe, args.repeats,
                                                                  args.torch_repeats)))
    body = render(heads, shape_rows, args)
    print(body)
    if not args.no_write and os.environ.get("MOEPACK_BENCH_NO_WRITE") != "1":
        update_section("kernels", body)


if __name__ == "__main__":
    main()
