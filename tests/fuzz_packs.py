"""Mutation fuzzer over whole packs: every mutant must either run correctly or be refused with a typed
MoepackError, never raise another exception, die by a signal or hang.

    python tests/fuzz_packs.py --mutants 2000 --seed 1        (`just fuzz`)

A base pack is compressed from a baby checkpoint of each family; each mutant is a copy with one mutation:
a manifest leaf (a number, string, type or deletion; the model config among them), raw manifest bytes or
nesting thousands of levels deep, shard bytes (header, a tensor, an expert), a shard truncated or extended,
a damaged tokenizer.json or config.json, a file replaced by a symbolic link, FIFO or folder, or removed.
"Live" mutants change or truncate a shard between two generate calls of one loaded model.

Each mutant runs `inspect` (pack_report), `verify` (check_pack) and `MoePackModel.load(...).generate`
(alternately without a budget, experts used in place, and with a small budget, experts streamed through
slots) in a worker process; the parent kills the worker on a hang and restarts it after a signal.
Outcomes: refused (typed error), accepted (same tokens as the base pack, or different: a mutated config or
dtype describes another valid model), and failures: crash (another exception type), signal, hang,
verify_gap (verify passed, run refused), wrong (a live mutant ran on to different tokens)."""

from __future__ import annotations

import argparse
import json
import os
import queue
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from pathlib import Path

PROMPT = "Now is the winter"
NEW_TOKENS = 3
FAILURES = ("crash", "signal", "hang", "verify_gap", "wrong")
KINDS = {  # mutation kind: weight
    "manifest_leaf": 26, "config_leaf": 12, "manifest_container": 5, "manifest_bytes": 5, "manifest_nest": 2,
    "shard_byte": 9, "shard_truncate": 4, "shard_extend": 2, "tokenizer_bytes": 4, "tokenizer_truncate": 3,
    "tokenizer_leaf": 4, "tokenizer_replace": 3, "config_file": 2, "symlink": 5, "fifo": 4, "remove": 2,
    "folder": 1, "live_shard_byte": 5, "live_shard_truncate": 4,
}
FILES = ("manifest.json", "tokenizer.json", "config.json", "shard-00000.bin")


# --- mutation plans (pure, from a seeded rng; JSON-serialisable so the parent can report them) -------------
def _leaves(obj, path=()):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaves(v, path + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _leaves(v, path + (i,))
    else:
        yield path, obj


def _containers(obj, path=()):
    if isinstance(obj, (dict, list)):
        yield path, obj
        for k, v in (obj.items() if isinstance(obj, dict) else enumerate(obj)):
            yield from _containers(v, path + (k,))


def _new_value(rng: random.Random, value, strings: list[str]):
    if isinstance(value, bool):
        choices = [not value, 0, "true", None]
    elif isinstance(value, int):
        choices = [value + 1, value - 1, 0, -1, value * 2, 2**31, 2**64, 10**400, value + 0.5, str(value), None, True]
    elif isinstance(value, float):
        choices = [value * 2, 0.0, -value, 1e308, 1.5, "x", None]
    elif isinstance(value, str):
        choices = ["", value + "x", value[:-1], "../../etc/passwd", 7, None, rng.choice(strings), value.upper()]
    else:
        choices = [0, "x", [], {}]
    return rng.choice(choices)


def plan(rng: random.Random, base: dict) -> dict:
    """One mutation, as data. `base` holds the base pack's parsed manifest and tokenizer."""
    kind = rng.choices(list(KINDS), weights=list(KINDS.values()))[0]
    p: dict = {"kind": kind}
    manifest, strings = base["manifest"], base["strings"]
    if kind in ("manifest_leaf", "config_leaf"):
        leaves = [(path, v) for path, v in _leaves(manifest)
                  if kind == "manifest_leaf" or path[:2] == ("model", "config")]
        path, value = rng.choice(leaves)
        p.update(path=list(path), delete=rng.random() < 0.12, value=_new_value(rng, value, strings))
    elif kind == "manifest_container":
        path, obj = rng.choice([c for c in _containers(manifest) if c[0]])
        p.update(path=list(path), op=rng.choice(["empty", "drop", "duplicate", "swap_type"]),
                 index=rng.randrange(max(len(obj), 1)))
    elif kind in ("manifest_bytes", "tokenizer_bytes", "config_file"):
        p.update(file={"manifest_bytes": "manifest.json", "tokenizer_bytes": "tokenizer.json"}.get(kind, "config.json"),
                 flips=[(rng.random(), rng.randrange(1, 256)) for _ in range(rng.randint(1, 4))])
    elif kind == "manifest_nest":
        p.update(depth=rng.choice([65, 5000, 200000]))
    elif kind in ("shard_byte", "live_shard_byte"):
        where = rng.choice(["header", "tensor", "expert", "expert", "anywhere"])
        recs = manifest["tensors"] if where == "tensor" else manifest["experts"]
        rec = rng.choice(recs)
        lo, hi = {"header": (0, 24), "anywhere": (0, manifest["shards"][0]["nbytes"])}.get(
            where, (rec["offset"], rec["offset"] + rec["nbytes"]))
        p.update(where=where, offset=rng.randrange(lo, hi), xor=rng.randrange(1, 256))
    elif kind in ("shard_truncate", "live_shard_truncate"):
        p.update(fraction=rng.choice([0.0, rng.random(), 0.999, 0.5]))
    elif kind == "shard_extend":
        p.update(extra=rng.choice([1, 7, 4096, 65536]))
    elif kind == "tokenizer_truncate":
        p.update(fraction=rng.random())
    elif kind == "tokenizer_leaf":
        leaves = list(_leaves(base["tokenizer"]))
        path, value = rng.choice(leaves)
        p.update(path=list(path), delete=rng.random() < 0.15, value=_new_value(rng, value, strings))
    elif kind == "tokenizer_replace":
        p.update(text=rng.choice(["", "{}", "[]", '{"model": 5}', "[" * 100000 + "]" * 100000, "\udcff",
                                  '{"version": "1.0", "model": {"type": "BPE", "vocab": {}, "merges": [["a"]]}}',
                                  "big_vocab"]))
    elif kind in ("symlink", "fifo", "remove", "folder"):
        p.update(file=rng.choice(FILES))
        if kind == "symlink":
            p.update(target=rng.choice(["outside_copy", "dev_zero", "dangling", "loop", "inside"]))
    return p


# --- applying a plan to a copy of the base pack -----------------------------------------------------------
def _set(obj, path, value, delete):
    for k in path[:-1]:
        obj = obj[k]
    if delete:
        del obj[path[-1]]
    else:
        obj[path[-1]] = value


def _edit_json(file: Path, fn) -> None:
    obj = json.loads(file.read_text())
    fn(obj)
    file.write_text(json.dumps(obj))


def _container_op(manifest, p):
    obj = manifest
    for k in p["path"][:-1]:
        obj = obj[k]
    target = obj[p["path"][-1]]
    if p["op"] == "empty":
        obj[p["path"][-1]] = type(target)()
    elif p["op"] == "swap_type":
        obj[p["path"][-1]] = list(target.values()) if isinstance(target, dict) else {str(i): v for i, v in enumerate(target)}
    elif target:
        keys = list(target) if isinstance(target, dict) else list(range(len(target)))
        k = keys[p["index"] % len(keys)]
        if p["op"] == "drop":
            del target[k]
        elif isinstance(target, list):
            target.append(target[k])
        else:
            target[k + "_copy"] = target[k]


def apply(p: dict, pack: Path, scratch: Path) -> None:
    kind = p["kind"]
    shard = pack / "shard-00000.bin"
    if kind in ("manifest_leaf", "config_leaf"):
        _edit_json(pack / "manifest.json", lambda m: _set(m, p["path"], p["value"], p["delete"]))
    elif kind == "manifest_container":
        _edit_json(pack / "manifest.json", lambda m: _container_op(m, p))
    elif kind in ("manifest_bytes", "tokenizer_bytes", "config_file"):
        data = bytearray((pack / p["file"]).read_bytes())
        for where, xor in p["flips"]:
            data[int(where * len(data))] ^= xor
        (pack / p["file"]).write_bytes(bytes(data))
    elif kind == "manifest_nest":
        m = json.loads((pack / "manifest.json").read_text())
        m["meta"] = "@NEST@"
        text = json.dumps(m).replace('"@NEST@"', "[" * p["depth"] + "]" * p["depth"])
        (pack / "manifest.json").write_text(text)
    elif kind in ("shard_byte", "live_shard_byte"):
        with open(shard, "r+b") as fh:
            fh.seek(p["offset"])
            b = fh.read(1)
            fh.seek(p["offset"])
            fh.write(bytes([b[0] ^ p["xor"]]))
    elif kind in ("shard_truncate", "live_shard_truncate"):
        os.truncate(shard, int(shard.stat().st_size * p["fraction"]))
    elif kind == "shard_extend":
        with open(shard, "ab") as fh:
            fh.write(b"\x5a" * p["extra"])
    elif kind == "tokenizer_truncate":
        tok = pack / "tokenizer.json"
        os.truncate(tok, int(tok.stat().st_size * p["fraction"]))
    elif kind == "tokenizer_leaf":
        _edit_json(pack / "tokenizer.json", lambda t: _set(t, p["path"], p["value"], p["delete"]))
    elif kind == "tokenizer_replace":
        if p["text"] == "big_vocab":  # ids past the model's vocabulary
            _edit_json(pack / "tokenizer.json",
                       lambda t: t["model"]["vocab"].update({f"zz{i}": 600 + i for i in range(100)}))
        else:
            (pack / "tokenizer.json").write_bytes(p["text"].encode("utf-8", "surrogateescape"))
    elif kind in ("symlink", "fifo", "remove", "folder"):
        f = pack / p["file"]
        outside = scratch / ("outside-" + p["file"])
        if kind == "symlink" and p["target"] in ("outside_copy", "inside"):
            shutil.copyfile(f, outside if p["target"] == "outside_copy" else pack / ("real-" + p["file"]))
        f.unlink()
        if kind == "fifo":
            os.mkfifo(f)
        elif kind == "folder":
            f.mkdir()
        elif kind == "symlink":
            target = {"outside_copy": outside, "dev_zero": Path("/dev/zero"), "dangling": scratch / "nothing",
                      "loop": f, "inside": Path("real-" + p["file"])}[p["target"]]
            f.symlink_to(target)
    else:
        raise ValueError(kind)


# --- the worker: runs inspect, verify and generate on one mutant ------------------------------------------
def _classify(fn) -> tuple[str, str]:
    from moepack.errors import MoepackError

    try:
        fn()
        return "ok", ""
    except MoepackError as exc:
        return "refused", f"{type(exc).__name__}: {str(exc)[-160:]}"
    except Exception as exc:  # noqa: BLE001 - the fuzzer's job is to catch exactly these
        tb = traceback.extract_tb(exc.__traceback__)[-1]
        return "crash", f"{type(exc).__name__}: {str(exc)[:160]} at {Path(tb.filename).name}:{tb.lineno}"


def _generate(pack: Path, vram, tokens: int = NEW_TOKENS, between=None, options: dict | None = None) -> list[int]:
    from moepack.runtime.api import MoePackModel

    model = MoePackModel.load(pack, device="cpu", backend="torch", context=32, vram=vram, **(options or {}))
    try:
        if between is not None:
            model.generate(PROMPT, max_new_tokens=1)
            between()
        return model.generate(PROMPT, max_new_tokens=tokens).tokens
    finally:
        model.pack.close()


def run_mutant(job: dict) -> dict:
    from moepack.cli.inspect_cmd import pack_report
    from moepack.format.reader import check_pack

    base, scratch = Path(job["base"]), Path(job["scratch"])
    pack = scratch / "mutant.moepack"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    shutil.copytree(base, pack)
    p, live = job["plan"], job["plan"]["kind"].startswith("live_")
    if not live:
        apply(p, pack, scratch)
    out = {"inspect": _classify(lambda: pack_report(pack))[0]}
    out["verify"], vmsg = _classify(lambda: check_pack(pack))
    tokens: list[int] = []

    def run():
        tokens.extend(_generate(pack, job["vram"], between=(lambda: apply(p, pack, scratch)) if live else None,
                                options=job["options"]))

    out["run"], out["message"] = _classify(run)
    if out["run"] == "ok":
        out["same"] = tokens == job["reference"]
    if out["verify"] == "crash":
        out["message"] = vmsg
    shutil.rmtree(scratch, ignore_errors=True)
    return out


def worker() -> None:
    import torch

    torch.set_num_threads(1)
    for line in sys.stdin:
        job = json.loads(line)
        if job.get("op") == "reference":
            res = {"tokens": _generate(Path(job["base"]), job["vram"], options=job["options"])}
        else:
            res = run_mutant(job)
        print("@@" + json.dumps(res), flush=True)


# --- the parent -----------------------------------------------------------------------------------------
class Worker:
    """A worker subprocess fed one job at a time; `call` returns its answer, or ('signal', n) / ('hang', s)."""

    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker"], text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     env={**os.environ, "PYTHONFAULTHANDLER": ""})
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            if line.startswith("@@"):
                self.lines.put(json.loads(line[2:]))
        self.lines.put(None)

    def call(self, job: dict, timeout: float):
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        try:
            res = self.lines.get(timeout=timeout)
        except queue.Empty:
            self.close()
            return ("hang", timeout)
        if res is None:
            return ("signal", self.proc.wait())
        return res

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def build_bases(root: Path, families: list[str]) -> list[dict]:
    from moepack.compress import compress
    from moepack.testing.checkpoints import make_baby_checkpoint

    bases = []
    for fam in families:  # "mixtral+calib": a calibrated pack, run with the profiled (auto) settings
        name, calibrated = fam.removesuffix("+calib"), fam.endswith("+calib")
        pack = root / f"{fam}.moepack"
        if not pack.exists():
            ckpt = make_baby_checkpoint(name, root / f"{name}-ckpt", num_hidden_layers=2)
            calib = None
            if calibrated:
                from moepack.profile import default_calibration_text

                calib = root / "calib.txt"
                calib.write_text(default_calibration_text())
            compress(str(ckpt), pack, recipe="q4g64", calib=calib)
        manifest = json.loads((pack / "manifest.json").read_text())
        tokenizer = json.loads((pack / "tokenizer.json").read_text())
        strings = sorted({v for _, v in _leaves(manifest) if isinstance(v, str)})
        options = {"adaptive_k": "auto", "fallback": "auto", "sparse_channels": "auto"} if calibrated else {}
        bases.append({"family": fam, "path": str(pack), "manifest": manifest, "tokenizer": tokenizer,
                      "strings": strings, "options": options})
    return bases


def small_budget(pack: Path) -> str:
    """The smallest budget (to 1 KiB) the base pack loads with: the fewest slots, so experts are read again."""
    from moepack.errors import BudgetError
    from moepack.runtime.api import MoePackModel

    def fits(size: int) -> bool:
        try:
            MoePackModel.load(pack, device="cpu", backend="torch", context=32, vram=size).pack.close()
            return True
        except BudgetError:
            return False

    lo, hi = 0, 1 << 20
    while not fits(hi):
        lo, hi = hi, hi * 2
    while hi - lo > 1024:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fits(mid) else (mid, hi)
    return str(hi)


def fuzz(mutants: int, seed: int, *, families: list[str], root: Path, timeout: float = 30.0,
         progress=None) -> dict:
    bases = build_bases(root, families)
    for b in bases:
        b["vram"] = small_budget(Path(b["path"]))
    w = Worker()
    refs = {}
    for b in bases:
        for vram in (None, b["vram"]):
            res = w.call({"op": "reference", "base": b["path"], "vram": vram, "options": b["options"]}, timeout=120)
            if not isinstance(res, dict):
                raise RuntimeError(f"the unmutated {b['family']} pack did not run: {res}")
            refs[b["family"], vram] = res["tokens"]
    outcomes: Counter = Counter()
    by_kind: dict[str, Counter] = {}
    failures, different, t0 = [], [], time.monotonic()
    for i in range(mutants):
        rng = random.Random(seed * 1_000_003 + i)
        b = bases[i % len(bases)]
        vram = b["vram"] if (i // len(bases)) % 2 else None
        p = plan(rng, b)
        job = {"base": b["path"], "scratch": str(root / "scratch"), "plan": p, "vram": vram,
               "reference": refs[b["family"], vram], "options": b["options"]}
        res = w.call(job, timeout)
        if not isinstance(res, dict):
            outcome, res = res[0], {"message": f"{res[0]} ({res[1]})"}
            w = Worker()
        elif "crash" in (res["inspect"], res["verify"], res["run"]):
            outcome = "crash"
        elif res["run"] == "ok":
            outcome = "accepted_same" if res["same"] else (
                "wrong" if p["kind"].startswith("live_") else "accepted_different")
        elif res["verify"] == "ok" and not p["kind"].startswith("live_") and \
                not res["message"].startswith("BudgetError"):  # live: damaged after verify; budget: an option
            outcome = "verify_gap"
        else:
            outcome = "refused"
        outcomes[outcome] += 1
        by_kind.setdefault(p["kind"], Counter())[outcome] += 1
        if outcome in FAILURES:
            failures.append({"mutant": i, "family": b["family"], "budget": vram, "plan": p, "outcome": outcome,
                             "message": res.get("message", "")})
        elif outcome == "accepted_different":
            different.append({"mutant": i, "family": b["family"], "plan": p})
        if progress:
            progress(i + 1, outcome)
    w.close()
    return {"mutants": mutants, "seed": seed, "families": families, "seconds": round(time.monotonic() - t0, 1),
            "outcomes": dict(outcomes), "by_kind": {k: dict(v) for k, v in sorted(by_kind.items())},
            "failures": failures, "different": different}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mutants", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--families", default="qwen2_moe,mixtral,olmoe+calib",
                    help="base packs; NAME+calib is compressed with calibration and run with the auto settings")
    ap.add_argument("--timeout", type=float, default=30.0, help="seconds a mutant may take before it is a hang")
    ap.add_argument("--report", type=Path, help="write the full result as JSON here")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker()
        return 0
    with tempfile.TemporaryDirectory(prefix="moepack-fuzz-") as tmp:
        def progress(n, outcome):
            if n % 100 == 0 or outcome in FAILURES:
                print(f"{n}/{args.mutants} {outcome}", file=sys.stderr, flush=True)

        rep = fuzz(args.mutants, args.seed, families=args.families.split(","), root=Path(tmp),
                   timeout=args.timeout, progress=progress)
    if args.report:
        args.report.write_text(json.dumps(rep, indent=1) + "\n")
    print(json.dumps({k: rep[k] for k in ("mutants", "seed", "seconds", "outcomes")}, indent=1))
    for f in rep["failures"][:20]:
        print(f"FAIL {f['outcome']} #{f['mutant']} {f['plan']['kind']}: {f['message'][:200]}")
    return 1 if rep["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
