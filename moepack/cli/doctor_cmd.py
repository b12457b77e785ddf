"""`moepack doctor`: build the compiled kernels ahead of time, check them, and say which path runs."""

from __future__ import annotations

import json


def run(json_out: bool = False) -> int:
    """Print the report (text or one JSON object); the exit code is 1 when a kernel check fails."""
    from moepack.kernels.check import report

    info = report()
    failed = [c for c in info["checks"] if not c["ok"]]
    if json_out:
        print(json.dumps(info, indent=2))
        return 1 if failed else 0
    cpp = info["cpp"]
    print(f"torch {info['torch']}, {info['threads']} threads, "
          f"CUDA {'available' if info['cuda_available'] else 'not available'}")
    print(f"torch CPU capability: {info['torch_cpu_capability']}")
    print(f"kernel path in use:   {info['isa']}")
    if not cpp["available"]:
        print(f"C++ kernels unavailable: {cpp['reason']}")
        return 0
    print(f"paths this CPU runs:  {', '.join(cpp['isas'])}")
    planes = {0: "off (fp32 kernels)", 1: "one int8 plane", 2: "two int8 planes"}[info["int8_planes"]]
    print(f"int8 activations:     {planes} (MOEPACK_CPU_Q8)")
    print(f"quantised prefill:    {info['prefill_gemm_why']}")
    print(f"build folder:         {cpp['build_dir']}")
    worst: dict[str, float] = {}
    for c in info["checks"]:
        s = c["sqnr_db"] if c["sqnr_db"] is not None else float("inf")
        worst[c["isa"]] = min(worst.get(c["isa"], float("inf")), s - c["bound_db"])
    for isa, margin in worst.items():
        n = sum(1 for c in info["checks"] if c["isa"] == isa)
        bad = sum(1 for c in failed if c["isa"] == isa)
        state = "ok" if not bad else f"{bad} FAILED"
        print(f"check {isa:<12} {n} products vs the reference: {state} (worst margin {margin:+.0f} dB)")
    for c in failed[:10]:
        print(f"  {c['isa']} {c['recipe']} cols={c['cols']} {c['op']} T={c['tokens']}: {c['sqnr_db']} dB "
              f"< {c['bound_db']} dB")
    return 1 if failed else 0
