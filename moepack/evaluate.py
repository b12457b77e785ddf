"""Quality of a pack: perplexity on a text, and against a reference checkpoint, mean KL(reference || pack).

The text is tokenised with the pack's tokenizer and cut into non-overlapping windows of `context` tokens
(default 512, capped at the model's max_position_embeddings; a final shorter window is kept when it has at
least 2 tokens). Each window is a fresh sequence:
its first token is only context, every later token is predicted from the ones before it in the window, so
`tokens` = sum over windows of (length - 1). Perplexity = exp(mean negative log-likelihood) over those
tokens; `kl` = the mean over the same positions of KL(p_ref || p_pack) in nats, between the next-token
distributions of the reference (the dense source model, `MoeModel.from_checkpoint`, which matches
transformers to 1e-6) and of the pack (run by the runtime, `MoePackModel`)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from moepack.errors import MoepackError
from moepack.profile.profiler import SMALL_EXPERT

DEFAULT_CONTEXT = 512
ProgressFn = Callable[[str, int, int], None]


@dataclass
class EvalResult:
    perplexity: float
    tokens: int  # predicted tokens (windows x (length - 1))
    context: int
    windows: int
    pack: str
    reference_perplexity: float | None = None
    kl: float | None = None  # mean KL(reference || pack) per predicted token, nats
    reference: str | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def token_windows(ids: list[int], context: int) -> list[list[int]]:
    """Non-overlapping windows of `context` tokens; a shorter tail is kept if it predicts at least one token."""
    if context < 2:
        raise MoepackError(f"--context must be at least 2 tokens, got {context}")
    out = [ids[i:i + context] for i in range(0, len(ids), context)]
    return [w for w in out if len(w) >= 2]


def read_text(path: str | Path) -> str:
    path = Path(path).expanduser()
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise MoepackError(f"cannot read the evaluation text: {exc.strerror}", path=path) from None


def evaluate(pack: str | Path, text: str, *, reference: str | Path | None = None, context: int = DEFAULT_CONTEXT,
             max_tokens: int | None = None, backend: str = "auto", decoded: bool = False,
             threads: int | None = None, progress: ProgressFn | None = None) -> EvalResult:
    """Perplexity of `pack` (a path or a model name in the pack store) on `text`; with `reference` (a checkpoint
    folder, hub id or alias) also the reference's perplexity and the mean KL(reference || pack).

    `decoded`: decode every expert once with the codecs' reference decoder and run them as dense float32
    weights (the numbers the TORCH backend defines, much faster for small models; needs every expert in RAM)
    instead of the runtime's streaming executor and kernels. `threads`: torch intra-op threads while
    evaluating; None: one for small models (as in moepack.profile.profile), else torch's setting."""
    from moepack.runtime.api import MoePackModel
    from moepack.source import resolve_pack

    t0 = time.perf_counter()
    path = resolve_pack(str(pack))
    model = MoePackModel.load(path, device="cpu", backend=backend)
    if threads is None:
        i, h = model.spec.expert_shape()
        threads = 1 if i * h < SMALL_EXPERT else torch.get_num_threads()
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            return _evaluate(model, path, text, reference, context, max_tokens, decoded, progress, t0)
    finally:
        torch.set_num_threads(saved)


def _evaluate(model, path: Path, text: str, reference, context: int, max_tokens: int | None, decoded: bool,
              progress: ProgressFn | None, t0: float) -> EvalResult:
    if decoded:
        model.model.executor = decoded_executor(model.pack)
    context = min(context, model.spec.max_position_embeddings)  # never run positions the model was not built for
    ids = model.encode(text)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    windows = token_windows(ids, context)
    if not windows:
        raise MoepackError(f"the evaluation text has {len(ids)} token(s); at least 2 are needed")
    ref_model = _reference_model(reference, model.spec) if reference is not None else None
    nll = ref_nll = kl = 0.0
    count = 0
    for i, window in enumerate(windows):
        target = torch.tensor(window[1:])
        logp = torch.log_softmax(model.logits(window)[:-1].double(), dim=-1)  # [T-1, V]
        nll -= float(logp.gather(1, target[:, None]).sum())
        if ref_model is not None:
            ref_logp = torch.log_softmax(ref_model.forward(torch.tensor(window))[:-1].double(), dim=-1)
            ref_nll -= float(ref_logp.gather(1, target[:, None]).sum())
            kl += float((ref_logp.exp() * (ref_logp - logp)).sum())
        count += len(window) - 1
        if progress:
            progress("eval", i + 1, len(windows))
    result = EvalResult(math.exp(nll / count), count, context, len(windows), str(path), seconds=0.0)
    if ref_model is not None:
        result.reference = str(reference)
        result.reference_perplexity = math.exp(ref_nll / count)
        result.kl = max(kl / count, 0.0)
    result.seconds = time.perf_counter() - t0
    return result


def decoded_executor(pack):
    """Every expert of `pack` decoded by the reference decoder into a DenseExpertExecutor (float32), with
    the family's expert biases and nonlinearity (GPT-OSS) from the pack's dense tensors."""
    from moepack.codecs import decode, parse_recipe
    from moepack.format import projection_parts
    from moepack.runtime.expert_compute import ExpertTerms
    from moepack.runtime.model import DenseExpertExecutor

    weights = {}
    for rec in pack.manifest.experts:
        blob = pack.expert_blob(rec.layer, rec.expert, verify=True)
        weights[(rec.layer, rec.expert)] = {
            p: decode(projection_parts(blob, pr), parse_recipe(pr.recipe), pr.shape) for p, pr in rec.projections.items()}
    dense = {t.name: pack.tensor(t.name) for t in pack.manifest.tensors} if pack.spec.expert_bias else {}
    return DenseExpertExecutor(weights, ExpertTerms.of(pack.spec, dense))


def _reference_model(reference: str | Path, pack_spec):
    from moepack.arch import spec_from_config
    from moepack.runtime.model import MoeModel
    from moepack.source import Checkpoint, resolve_source

    folder = resolve_source(str(reference))
    spec = spec_from_config(Checkpoint(folder).config)
    if (spec.family, spec.vocab_size, spec.num_layers, spec.num_experts) != (
            pack_spec.family, pack_spec.vocab_size, pack_spec.num_layers, pack_spec.num_experts):
        raise MoepackError(f"the reference ({spec.family}, vocab {spec.vocab_size}, {spec.num_layers} layers, "
                           f"{spec.num_experts} experts) is not the model the pack was made from "
                           f"({pack_spec.family}, vocab {pack_spec.vocab_size}, {pack_spec.num_layers} layers, "
                           f"{pack_spec.num_experts} experts)", path=folder)
    return MoeModel.from_checkpoint(folder, dtype=torch.float32)
