"""Peak memory of `moepack compress` against the size of the checkpoint (issue 2).

    python -m benchmarks.bench_compress_memory [--quick] [--sizes 2x8,4x16,8x16] [--recipe q4g128]

Generates Mixtral-layout checkpoints of growing size (moepack.testing.checkpoints.make_random_checkpoint,
bfloat16, hidden 1024, expert intermediate 2816; sizes are LAYERSxEXPERTS), runs `moepack compress SRC -o OUT
--recipe q4g128` on each in a child process and records that child's own peak RSS (VmHWM from /proc, sampled
until it exits), its wall time and the bytes written. If the compressor streams tensor
by tensor, peak RSS stays flat while the checkpoint grows. Writes the "compress-memory" section.
Checkpoints go to $MOEPACK_BENCH_DIR (default ~/.cache/moepack/bench) and are deleted after each measurement
unless --keep; the page cache is not dropped (no root assumptions), so file pages mapped by the compressor
count in its RSS, as they would for a user."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.peers.common import BENCH_DIR, disk_bytes, fmt_bytes, log
from benchmarks.report import markdown_table, update_section

HIDDEN, INTERMEDIATE, VOCAB = 1024, 2816, 32000
RESULTS = BENCH_DIR / "compress_memory.json"  # measured rows, reused unless --fresh


def vm_hwm(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def run_measured(cmd: list[str]) -> tuple[int, float, int]:
    """(exit status, wall seconds, peak RSS bytes) of one child process. Peak RSS is the child's own VmHWM,
    sampled every 0.2 s until it exits (monotonic, so the last sample is the peak up to the last 0.2 s). Not
    `os.wait4`'s ru_maxrss: Linux carries the parent's high-water mark across vfork+exec, so a child of this
    (multi-hundred-MB) process would never report less than this process's own peak."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, vm_hwm(proc.pid) or 0)
        time.sleep(0.2)
    wall = time.perf_counter() - t0
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if proc.returncode != 0:
        log(f"  failed: {err.strip()[-500:]}")
    return proc.returncode, wall, peak


def measure(sizes: list[tuple[int, int]], recipe: str, keep: bool, fresh: bool = False) -> list[dict]:
    from moepack.testing.checkpoints import make_random_checkpoint

    rows = []
    saved = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    for layers, experts in sizes:
        name = f"compress-mem-h{HIDDEN}-i{INTERMEDIATE}-l{layers}-e{experts}"
        src, out = BENCH_DIR / name, BENCH_DIR / f"{name}.{recipe}.moepack"
        if f"{name}.{recipe}" in saved and not fresh:
            log(f"compress-memory: {name} {recipe}: measured before ({RESULTS}); --fresh measures again")
            rows.append(saved[f"{name}.{recipe}"])
            continue
        if not (src / "config.json").exists():
            log(f"compress-memory: generating {src}")
            t0 = time.perf_counter()
            make_random_checkpoint(src, hidden=HIDDEN, intermediate=INTERMEDIATE, layers=layers, experts=experts,
                                   vocab=VOCAB, dtype="bfloat16", shard_size="1GB")
            log(f"  {fmt_bytes(disk_bytes(src))} in {time.perf_counter() - t0:.0f} s")
        size = sum(p.stat().st_size for p in src.glob("*.safetensors"))
        log(f"compress-memory: moepack compress {fmt_bytes(size)} --recipe {recipe}")
        rc, wall, rss = run_measured([sys.executable, "-m", "moepack", "compress", str(src), "-o", str(out),
                                      "--recipe", recipe, "--force", "--json"])
        # the same child's baseline: interpreter + imports, no work
        _, _, idle = run_measured([sys.executable, "-c", "import moepack.compress, moepack.cli.app"])
        packed = disk_bytes(out) if out.exists() else 0
        log(f"  rc {rc}, {wall:.0f} s, peak RSS {fmt_bytes(rss)}, pack {fmt_bytes(packed)}")
        rows.append({"layers": layers, "experts": experts, "checkpoint_bytes": size, "rc": rc, "wall_s": wall,
                     "peak_rss_bytes": rss, "idle_rss_bytes": idle, "pack_bytes": packed,
                     "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())})
        if rc == 0:
            saved[f"{name}.{recipe}"] = rows[-1]
            RESULTS.write_text(json.dumps(saved, indent=1))
        if not keep:
            shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(src, ignore_errors=True)
    return rows


def render(rows: list[dict], recipe: str) -> str:
    headers = ["checkpoint", "layers x experts", "pack", "compress wall s", "MB/s", "peak RSS",
               "peak RSS - import baseline", "peak RSS / checkpoint", "measured"]
    table = []
    for r in rows:
        ok = r["rc"] == 0
        table.append([fmt_bytes(r["checkpoint_bytes"]), f"{r['layers']} x {r['experts']}",
                      fmt_bytes(r["pack_bytes"]) if ok else f"failed (exit {r['rc']})", f"{r['wall_s']:.0f}",
                      f"{r['checkpoint_bytes'] / r['wall_s'] / 1e6:.1f}", fmt_bytes(r["peak_rss_bytes"]),
                      fmt_bytes(r["peak_rss_bytes"] - r["idle_rss_bytes"]),
                      f"{r['peak_rss_bytes'] / r['checkpoint_bytes']:.2f}", r.get("measured", "-")])
    growth = ""
    if len(rows) >= 2 and all(r["rc"] == 0 for r in rows):
        a, b = rows[0], rows[-1]
        growth = (f"\nFrom {fmt_bytes(a['checkpoint_bytes'])} to {fmt_bytes(b['checkpoint_bytes'])} of checkpoint "
                  f"({b['checkpoint_bytes'] / a['checkpoint_bytes']:.1f}x), peak RSS went from "
                  f"{fmt_bytes(a['peak_rss_bytes'])} to {fmt_bytes(b['peak_rss_bytes'])} "
                  f"({b['peak_rss_bytes'] / a['peak_rss_bytes']:.2f}x).\n")
    return (f"`moepack compress SRC -o OUT --recipe {recipe}` in a child process on generated bfloat16 Mixtral-layout "
            f"checkpoints (hidden {HIDDEN}, expert intermediate {INTERMEDIATE}, vocab {VOCAB}, 1 GB shards); peak RSS "
            f"is the child's own VmHWM (/proc), sampled until it exits. The import baseline is the peak RSS of a child that only imports the "
            f"compressor and CLI ({fmt_bytes(rows[0]['idle_rss_bytes']) if rows else '-'}).\n\n"
            + markdown_table(headers, table) + growth)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="two sizes: 2x4 and 2x16 (about 0.2 and 0.7 GB)")
    ap.add_argument("--sizes", default=None, help="LAYERSxEXPERTS list (default 2x8,8x16: about 0.4 and 2.3 GB)")
    ap.add_argument("--recipe", default="q4g128")
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoints and packs")
    ap.add_argument("--fresh", action="store_true", help="measure again sizes measured before")
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args(argv)
    sizes_s = a.sizes or ("2x4,2x16" if a.quick else "2x8,8x16")
    sizes = [tuple(int(v) for v in s.lower().split("x")) for s in sizes_s.split(",")]
    t0 = time.perf_counter()
    rows = measure(sizes, a.recipe, a.keep, a.fresh)
    body = render(rows, a.recipe) + f"\n_Module wall time {time.perf_counter() - t0:.0f} s._\n"
    print(body)
    if not a.no_write:
        update_section("compress-memory", body)


if __name__ == "__main__":
    main()
