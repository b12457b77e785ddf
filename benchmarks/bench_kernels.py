"""Time the CPP kernels against the TORCH reference for quantised GEMV (one token).

    python -m benchmarks.bench_kernels [--shapes 4096x1024,8192x2048] [--bits 4,2] [--group 64]
                                       [--threads 1,2] [--repeats 20]

For each shape (rows x cols of a channel-major expert matrix, e.g. a scaled-down 14336x4096), bit width
and thread count it reports medians of:
  * TORCH  matmul: decode with the codec reference, then x @ W.T (what the runtime does without kernels);
  * CPP    matmul (x @ W.T) and matmul_t (h @ W) through the fused kernels;
  * dense  fp32 x @ W.T on an already-decoded matrix (what a decompressed cache would cost);
and the CPP throughput in GB/s of *packed* bytes (codes + scales + zeros), next to this machine's memory
copy bandwidth (a large torch copy; bytes read + bytes written per second). Prints a markdown table.
The machine's cores may be shared: compare numbers from the same run only.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.report import median_time
from moepack.codecs import as_recipe
from moepack.kernels import Backend, compiled, matmul, matmul_t
from moepack.kernels._build import CPP


def copy_bandwidth(nbytes: int = 256 << 20, repeats: int = 9) -> float:
    """GB/s of (read + written) bytes for a large contiguous torch copy."""
    src = torch.empty(nbytes, dtype=torch.uint8).fill_(1)
    dst = torch.empty_like(src).fill_(0)
    t = median_time(lambda: dst.copy_(src), repeats=repeats)[0]
    return 2 * nbytes / t / 1e9


def random_parts(rows: int, cols: int, bits: int, group: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "codes": torch.randint(0, 256, (rows, cols * bits // 8), generator=g, dtype=torch.uint8),
        "scale": (torch.rand(rows, cols // group, generator=g) * 0.01 + 1e-4).half(),
        "zero": (torch.rand(rows, cols // group, generator=g) * (2**bits - 1)).half(),
    }


def bench_one(rows: int, cols: int, recipe: str, repeats: int, torch_repeats: int) -> tuple:
    """(packed bytes, TORCH matmul s, CPP matmul s, CPP matmul_t s, dense fp32 GEMV s)."""
    r, shape = as_recipe(recipe), (rows, cols)
    parts = random_parts(rows, cols, r.bits, r.group)
    packed = sum(p.numel() * p.element_size() for p in parts.values())
    x, h = torch.randn(1, cols), torch.randn(1, rows)
    dense = compiled.dequantize(CPP, parts, r, cols, None, "cpu")  # [rows, cols] fp32
    t_ref = median_time(lambda: matmul(x, parts, r, shape, backend=Backend.TORCH), repeats=torch_repeats)[0]
    t_mm = median_time(lambda: matmul(x, parts, r, shape, backend=Backend.CPP), repeats=repeats)[0]
    t_mt = median_time(lambda: matmul_t(h, parts, r, shape, backend=Backend.CPP), repeats=repeats)[0]
    t_fp = median_time(lambda: x @ dense.T, repeats=repeats)[0]
    return packed, t_ref, t_mm, t_mt, t_fp


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="4096x1024,8192x2048")
    ap.add_argument("--bits", default="4,2")
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--torch-repeats", type=int, default=3, help="repeats of the (slow) TORCH reference")
    args = ap.parse_args()
    if not CPP.available():
        raise SystemExit(f"C++ kernels unavailable: {CPP._error or CPP.disabled_reason()}")

    rows_out = []
    copy_bw = {}
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        copy_bw[threads] = copy_bandwidth()
        for shape_s in args.shapes.split(","):
            rows, cols = (int(v) for v in shape_s.lower().split("x"))
            for bits in (int(b) for b in args.bits.split(",")):
                recipe = f"q{bits}g{args.group}"
                res = bench_one(rows, cols, recipe, args.repeats, args.torch_repeats)
                rows_out.append((shape_s, recipe, threads, *res))
                print(
                    f"# {shape_s} {recipe} threads={threads}: torch {res[1] * 1e3:.1f} ms, cpp {res[2] * 1e3:.2f} ms"
                )

    print()
    print(
        f"CPU: {torch.backends.cpu.get_cpu_capability()}, torch {torch.__version__}; GEMV with T=1 token, medians."
    )
    print()
    print(
        "| shape | recipe | threads | packed MB | TORCH matmul ms | CPP matmul ms | speedup | CPP matmul GB/s "
        "| CPP matmul_t ms | CPP matmul_t GB/s | dense fp32 GEMV ms | copy GB/s (r+w) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for shape_s, recipe, threads, packed, t_ref, t_mm, t_mt, t_fp in rows_out:
        print(
            f"| {shape_s} | {recipe} | {threads} | {packed / 1e6:.1f} | {t_ref * 1e3:.1f} | {t_mm * 1e3:.2f} "
            f"| {t_ref / t_mm:.0f}x | {packed / t_mm / 1e9:.2f} | {t_mt * 1e3:.2f} | {packed / t_mt / 1e9:.2f} "
            f"| {t_fp * 1e3:.2f} | {copy_bw[threads]:.1f} |"
        )


if __name__ == "__main__":
    main()
