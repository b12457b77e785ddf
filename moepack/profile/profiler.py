"""Per-expert calibration profile: routing frequency, input statistics, and each candidate recipe's output error.

The calibration windows run through the source model layer by layer: the lean forward (`MoeModel`) holds
only the dense weights, and its expert executor here reads one expert at a time from the checkpoint while
the whole calibration batch sits at that layer. So at most one expert's weights are in memory, whatever
the model's size. For every expert e of a sparse layer, on the tokens routed to it (x [n, H]):

- `tokens` / `frequency`: routed token slots, and their share of the layer's slots (sums to 1 per layer);
- `importance[gate|up]`: mean x^2 per input column [H], the activation-aware weighting that `encode` takes.
  `down` is stored channel-major [I, H] (= w2.T): its encode columns are output channels, which all count
  alike in ||y - y^||^2, while the activation statistics (mean h^2 over I) weight its *rows*. Every codec
  stage but the low-rank residual fits rows independently, so a row weight cannot change the result: down
  is encoded without importance, and its error is measured on the real intermediate activations below.
- `errors[proj][recipe]`: relative squared output error ||y - y^||^2 / ||y||^2 of the expert's SwiGLU
  output on its routed tokens when only `proj` is compressed with `recipe` (the others exact). These add
  up (approximately) over projections, which is what lets the planner choose per projection. For plain
  q{b}g{G} recipes both the optimised quantiser and min/max round-to-nearest are measured and the better
  kept (`rtn[proj]` names the recipes where RTN won; compress then encodes those with RTN).

For adaptive execution (runtime/adaptive.py, `auto` settings), on the same tokens:

- `sparsity`: FloE's selection error at each keep fraction of KEEP_GRID: ||y - y_keep||^2 / ||y||^2 of the
  expert when each token computes only its channels of largest |up(x)| (the runtime's rule);
- `channel_order`: the expert's intermediate channels, most often selected first (summed over KEEP_GRID on the
  same tokens): compress stores the channels in this order, which leaves the expert's function unchanged but
  makes a token's FloE subset mostly a prefix of rows, so a partial load is a few contiguous reads;
- `energy`: what the expert adds to the residual stream per routed token, mean w^2 ||y||^2 over its routed
  tokens (w: the router weight) over the layer's mean ||x||^2: a relative error of the expert costs the model
  in proportion to it (it spans three orders of magnitude on the trained toy model);
- `Profile.drop_error[layer]`: c in err(token) ~ c (1 - share)^2, the relative squared error of the layer's
  MoE output when a token runs only its little half of top-k (share: the little half's router weight). The
  difference is exactly (1 - share) (mean little output - mean big output), so c is the ratio of sums
  sum ||y_little - y||^2 / sum (1 - share)^2 ||y||^2 over the calibration tokens.

An expert routed fewer than `MIN_ROUTED` tokens is measured on a sample of all of the layer's tokens instead
(`fallback_inputs`), so even an expert calibration never chose gets a meaningful error."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from moepack.codecs import decode, encode, encoded_nbytes, parse_recipe, quantize_rtn
from moepack.errors import CodecError
from moepack.format.constants import PROJECTIONS
from moepack.runtime.adaptive import channel_mask, little_share
from moepack.runtime.expert_compute import ExpertTerms

ProgressFn = Callable[[str, int, int], None]
Key = tuple[int, int]

# Candidate recipes the profiler measures by default (the planner chooses among those that fit the shape).
DEFAULT_CANDIDATES = (
    "fp16", "q4g32", "q4g64", "q4g128", "q3g32", "q3g64", "q3g128", "q2g32", "q2g64", "q2g128",
    "2:4+q4g64", "q2g64+r8", "q2g64+r16", "q2g128+r16",
)
# Used only when the default candidates cannot reach the target (e.g. 9x from a bf16 source, where q2g128
# gives 7.1x): 1:4 sparsity with quantised kept values reaches 10-12x, at a large error the planner weighs.
EXTREME_CANDIDATES = ("1:4+q4g128", "1:4+q3g128")
ERROR_KIND = ("relative output error ||y - y^|| / ||y|| of the expert on its routed calibration tokens, "
              "only this projection compressed")
MIN_ROUTED = 8  # fewer routed tokens than this: measure the expert on the layer's tokens instead
DEFAULT_MAX_ROWS = 2048  # tokens per expert used to measure errors (evenly spaced sample)
SMALL_EXPERT = 1 << 22  # weights per projection below which profiling runs on one thread (see profile)
DEFAULT_MAX_CHANNELS = 1024  # intermediate channels encoded per candidate (see measure_errors); toy/baby: all
SPARSITY_ROWS = 256  # tokens per expert for the FloE selection error (nine products over them)
KEEP_GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)  # FloE keep fractions whose error is profiled


@dataclass
class ExpertProfile:
    layer: int
    expert: int
    tokens: int  # routed token slots in calibration
    frequency: float  # tokens / routed slots of the layer
    importance: dict[str, torch.Tensor | None]  # encode importance per projection ([H] for gate/up, None for down)
    errors: dict[str, dict[str, float]] = field(default_factory=dict)  # proj -> recipe -> rel. squared error
    fallback_inputs: bool = False
    rtn: dict[str, set[str]] = field(default_factory=dict)  # proj -> recipes whose best encoder is plain RTN
    sparsity: tuple[float, ...] = ()  # FloE selection error at each KEEP_GRID fraction (see module docstring)
    energy: float = 0.0  # mean w^2 ||y||^2 per routed token over the layer's mean ||x||^2 (see module docstring)
    channel_order: torch.Tensor | None = None  # [I] channels by FloE selection frequency (see module docstring)


@dataclass
class Profile:
    source: str
    model_type: str
    calib_source: str
    tokens: int
    candidates: tuple[str, ...]
    experts: dict[Key, ExpertProfile] = field(default_factory=dict)
    seconds: float = 0.0
    channels_sampled: int | None = None  # errors estimated on this many channels per projection (None: all)
    drop_error: dict[int, float] = field(default_factory=dict)  # layer -> c of err ~ c (1 - little share)^2
    adaptive_scale: float | None = None  # factor on the `auto` targets chosen end to end (profile/tune.py)
    tune_curve: list[tuple[float, float]] = field(default_factory=list)  # (scale, worst-case KL nats/token)

    def frequencies(self) -> dict[Key, float]:
        return {k: p.frequency for k, p in self.experts.items()}

    def error_table(self) -> dict[tuple[int, int, str], dict[str, float]]:
        """(layer, expert, proj) -> {recipe: relative squared output error}."""
        return {(k[0], k[1], proj): dict(errs) for k, p in self.experts.items() for proj, errs in p.errors.items()}

    def importance(self, layer: int, expert: int, proj: str) -> torch.Tensor | None:
        return self.experts[(layer, expert)].importance.get(proj)

    def encoder(self, layer: int, expert: int, proj: str, recipe: str) -> str:
        """"rtn" when min/max round-to-nearest gave this projection the smaller output error, else "optimised"."""
        return "rtn" if recipe in self.experts[(layer, expert)].rtn.get(proj, ()) else "optimised"

    def adaptive(self) -> dict:
        """What the manifest's meta keeps for `auto` adaptive settings (read by runtime/adaptive.py)."""
        return {"tokens": self.tokens, "keep_grid": list(KEEP_GRID),
                "sparse_error": [[k[0], k[1], [round(e, 8) for e in p.sparsity]]
                                 for k, p in sorted(self.experts.items()) if p.sparsity],
                "sparse_weight": [[k[0], k[1], float(f"{p.energy:.6g}")]
                                  for k, p in sorted(self.experts.items()) if p.sparsity],
                "drop_error": [[layer, round(c, 8)] for layer, c in sorted(self.drop_error.items())],
                "scale": 1.0 if self.adaptive_scale is None else self.adaptive_scale,
                "tune_kl": [[s, round(kl, 6)] for s, kl in self.tune_curve]}

    def adaptive_calibration(self):
        from moepack.runtime.adaptive import AdaptiveCalibration

        return AdaptiveCalibration(KEEP_GRID, {k: p.sparsity for k, p in self.experts.items() if p.sparsity},
                                   dict(self.drop_error),
                                   sparse_weight={k: p.energy for k, p in self.experts.items() if p.sparsity})

    def summary(self) -> dict:
        """What the manifest's meta keeps about the calibration: no timings, so the same input gives the same
        bytes (the time is in the compress report, and in `compress --json` as profile_seconds)."""
        out = {"source": self.calib_source, "tokens": self.tokens, "candidates": list(self.candidates)}
        if self.channels_sampled is not None:
            out["channels_sampled"] = self.channels_sampled
        out["rtn_encoded"] = sum(len(v) for p in self.experts.values() for v in p.rtn.values())
        return out


def usable_candidates(candidates: Sequence[str], shape: tuple[int, int]) -> tuple[str, ...]:
    """Canonical names of the candidates that fit expert projections of `shape` (others are skipped)."""
    out: list[str] = []
    for c in candidates:
        r = parse_recipe(c)  # a malformed recipe is the user's error: raise it
        try:
            encoded_nbytes(r, shape)
        except CodecError:
            continue
        if str(r) not in out:
            out.append(str(r))
    if not out:
        raise CodecError(f"no candidate recipe fits expert projections of shape {list(shape)}: {', '.join(candidates)}")
    return tuple(out)


def _sample_rows(x: torch.Tensor, max_rows: int) -> torch.Tensor:
    if x.shape[0] <= max_rows:
        return x
    idx = torch.linspace(0, x.shape[0] - 1, max_rows).round().long()
    return x[idx]


def sparsity_errors(x: torch.Tensor, w: dict[str, torch.Tensor], grid: Sequence[float] = KEEP_GRID,
                    terms: ExpertTerms | None = None, key: Key | None = None) -> tuple[tuple[float, ...], torch.Tensor]:
    """(FloE's selection error ||y - y_keep||^2 / ||y||^2 on x [n, H] at each keep fraction of `grid`, the
    channels [I] ordered by how often they are selected over the grid, most first): every token keeps its
    ceil(keep * I) channels of largest |up(x)| (adaptive.select_channels' rule; with `terms`, the family's
    biases and nonlinearity, of the largest |up factor| as the runtime's sparse_ffn)."""
    t = terms or ExpertTerms.plain()
    u = t.up_factor(key, x @ w["up"].T)  # [n, I]
    h = t.gate_act(key, x @ w["gate"].T) * u
    y = t.out(key, h @ w["down"])
    energy = float(y.double().square().sum())
    out, chosen = [], torch.zeros(u.shape[1], dtype=torch.long)
    for keep in grid:
        mask = channel_mask(u, keep)
        chosen += mask.sum(0)
        err = float((y - (h * mask) @ w["down"]).double().square().sum())
        out.append(err / energy if energy > 0 else 0.0)
    return tuple(out), torch.argsort(chosen, descending=True, stable=True)


def measure_errors(x: torch.Tensor, w: dict[str, torch.Tensor], candidates: Sequence[str],
                   importance: dict[str, torch.Tensor | None], *, max_channels: int | None = None,
                   rtn: dict[str, set[str]] | None = None, terms: ExpertTerms | None = None,
                   key: Key | None = None) -> dict[str, dict[str, float]]:
    """errors[proj][recipe]: ||y - y^||^2 / ||y||^2 of the SwiGLU expert on x [n, H], only `proj` compressed.

    With `max_channels` < I, recipes without a low-rank residual are encoded on an evenly spaced subset S of
    the intermediate channels only: every other codec stage fits each row (channel) on its own, so the rows
    of S come out exactly as in the full encode, and the error of the channels in S, scaled by I/|S|,
    estimates the full one (exact but for correlations between channels' errors). Cost falls by I/|S|.

    With `rtn` (a dict to fill), plain q{b}g{G} recipes are also encoded with min/max round-to-nearest, the
    smaller output error is kept, and rtn[proj] collects the recipes where RTN won. (The optimised quantiser
    minimises a weighted weight error with an l_p, p < 1, term that lets outlier weights keep their error; on
    the trained toy model its *output* error on gate/up was 1.3-3x RTN's at 2-4 bits, so both are tried.)"""
    gate, up, down = w["gate"], w["up"], w["down"]  # each [I, H] channel-major
    t = terms or ExpertTerms.plain()  # the family's biases and nonlinearity (GPT-OSS), else silu(g) * u
    u = t.up_factor(key, x @ up.T)  # [n, I]
    a = t.gate_act(key, x @ gate.T)
    h = a * u
    y = t.out(key, h @ down)  # [n, H]
    y_energy = float(y.double().square().sum())
    n_ch = gate.shape[0]
    subset = None
    if max_channels is not None and n_ch > max_channels:
        subset = torch.linspace(0, n_ch - 1, max_channels).round().long()
    out: dict[str, dict[str, float]] = {}
    for proj in PROJECTIONS:
        out[proj] = {}
        for name in candidates:
            r = parse_recipe(name)
            rows = subset if subset is not None and not r.rank else None
            w_p = w[proj] if rows is None else w[proj][rows]
            try:
                w_hat = decode(encode(w_p, r, importance=importance.get(proj)), r, tuple(w_p.shape))
            except CodecError:
                continue  # e.g. fp16 cannot hold this matrix: never a choice
            hats = [("optimised", w_hat)]
            if rtn is not None and r.bits is not None and not r.sparse and not r.rank and not r.dq:
                hats.append(("rtn", decode(quantize_rtn(w_p, r.bits, r.group), r, tuple(w_p.shape))))
            for encoder, w_hat in hats:
                if rows is None:
                    if proj == "gate":
                        dy = ((t.gate_act(key, x @ w_hat.T) - a) * u) @ down
                    elif proj == "up":
                        dy = (a * (t.up_factor(key, x @ w_hat.T) - u)) @ down
                    else:
                        dy = h @ (w_hat - down)
                    scale = 1.0
                else:
                    if proj == "gate":
                        dy = ((t.gate_act(key, x @ w_hat.T, rows) - a[:, rows]) * u[:, rows]) @ down[rows]
                    elif proj == "up":
                        dy = (a[:, rows] * (t.up_factor(key, x @ w_hat.T, rows) - u[:, rows])) @ down[rows]
                    else:
                        dy = h[:, rows] @ (w_hat - down[rows])
                    scale = n_ch / len(rows)
                err = scale * float(dy.double().square().sum())
                rel = err / y_energy if y_energy > 0 else (0.0 if err == 0 else float("inf"))
                if name not in out[proj] or rel < out[proj][name]:
                    out[proj][name] = rel
                    if encoder == "rtn":
                        rtn.setdefault(proj, set()).add(name)
    return out


class ProfilingExecutor:
    """An expert executor for `MoeModel` that reads each expert from the checkpoint when its layer runs,
    computes its exact output, measures every candidate on its routed tokens, and forgets it."""

    def __init__(self, ckpt, adapter, spec, candidates: Sequence[str], *, max_rows: int = DEFAULT_MAX_ROWS,
                 max_channels: int | None = DEFAULT_MAX_CHANNELS, try_rtn: bool = True,
                 progress: ProgressFn | None = None, terms: ExpertTerms | None = None):
        self.ckpt, self.adapter, self.spec = ckpt, adapter, spec
        self.terms = terms or ExpertTerms.plain()  # the family's expert biases and nonlinearity
        self.try_rtn = try_rtn
        self.candidates = tuple(candidates)
        self.max_rows, self.max_channels = max_rows, max_channels
        self.progress = progress
        self.experts: dict[Key, ExpertProfile] = {}
        self.drop_error: dict[int, float] = {}
        self._done = 0
        self._total = len(spec.sparse_layer_ids) * spec.num_experts

    def forward(self, layer: int, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        from moepack.compress import load_expert

        out = torch.zeros_like(x)
        little = torch.zeros_like(x)  # each token's output from its little half alone, rescaled (big-little)
        kl = max(1, topk_ids.shape[1] // 2)
        share = little_share(topk_weights)  # [T]
        counts = torch.bincount(topk_ids.flatten(), minlength=self.spec.num_experts)  # [E]
        slots = int(topk_ids.numel())
        layer_sample = _sample_rows(x, self.max_rows)
        x_energy = float(x.double().square().sum(1).mean())  # the layer's mean ||x||^2
        w2_mean = float(topk_weights.double().square().mean())  # for experts calibration (almost) never chose
        for e in range(self.spec.num_experts):
            w = {p: t.to(torch.float32) for p, t in load_expert(self.ckpt, self.adapter, layer, e).items()}
            tok, slot = (topk_ids == e).nonzero(as_tuple=True)
            xe = x[tok]  # [n, H]
            y = self._ffn((layer, e), xe, w)
            yw = y * topk_weights[tok, slot, None].to(y.dtype)
            out.index_add_(0, tok, yw)
            lit = slot < kl
            little.index_add_(0, tok[lit], yw[lit] / share[tok[lit], None].to(y.dtype))
            fallback = len(tok) < MIN_ROUTED
            probe = layer_sample if fallback else xe
            imp = probe.square().mean(0)  # [H] mean squared activation per input column
            importance = {"gate": imp, "up": imp, "down": None}
            rtn: dict[str, set[str]] | None = {} if self.try_rtn else None
            errors = measure_errors(_sample_rows(probe, self.max_rows), w, self.candidates, importance,
                                    max_channels=self.max_channels, rtn=rtn, terms=self.terms, key=(layer, e))
            sparsity, order = sparsity_errors(_sample_rows(probe, min(self.max_rows, SPARSITY_ROWS)), w,
                                              terms=self.terms, key=(layer, e))
            if fallback:  # its output on the layer's tokens, at the layer's mean squared router weight
                yp = self._ffn((layer, e), probe, w)
                added = w2_mean * float(yp.double().square().sum(1).mean())
            else:
                added = float(yw.double().square().sum(1).mean())
            energy = added / x_energy if x_energy > 0 else 0.0
            self.experts[(layer, e)] = ExpertProfile(layer, e, int(counts[e]), int(counts[e]) / max(slots, 1),
                                                     importance, errors, fallback, rtn or {}, sparsity, energy,
                                                     order)
            del w, xe, y
            self._done += 1
            if self.progress:
                self.progress("profile", self._done, self._total)
        if topk_ids.shape[1] > kl:
            dropped = float((little - out).double().square().sum())
            scale = float(((1 - share.double()).square() * out.double().square().sum(1)).sum())
            self.drop_error[layer] = dropped / scale if scale > 0 else 0.0
        return out


    def _ffn(self, key: Key, x: torch.Tensor, w: dict[str, torch.Tensor]) -> torch.Tensor:
        """The exact expert output on x [n, H] (silu(g) * u, or the family's terms)."""
        t = self.terms
        return t.out(key, (t.gate_act(key, x @ w["gate"].T) * t.up_factor(key, x @ w["up"].T)) @ w["down"])


def shape_i(spec) -> int:
    return spec.expert_shape()[0]


def profile(src: str, calib: str | None = None, *, candidates: Sequence[str] = DEFAULT_CANDIDATES,
            seq_len: int | None = None, max_tokens: int | None = None, max_rows: int = DEFAULT_MAX_ROWS,
            max_channels: int | None = DEFAULT_MAX_CHANNELS, threads: int | None = None, try_rtn: bool = True,
            tune: bool = True, progress: ProgressFn | None = None) -> Profile:
    """Profile every expert of the checkpoint `src` (folder, hub id or alias) on `calib` (a text file;
    None: the embedded calibration text). See the module docstring for what is recorded.

    `threads`: torch intra-op threads while profiling. None: one thread when expert projections are small
    (< SMALL_EXPERT weights), where the work is many small ops and the pool only adds synchronisation
    (profiling a baby model took 302 s with 2 threads and 19 s with 1 on a loaded 2-core host), else
    torch's current setting. `try_rtn`: also measure min/max round-to-nearest for plain q{b}g{G} recipes and
    keep whichever encoder gives the smaller output error (same bytes and format; see measure_errors).
    `tune`: choose the scale of the `auto` adaptive targets end to end (profile/tune.py: a few more
    forwards over up to TUNE_TOKENS calibration tokens)."""
    from moepack.arch import adapter_for, spec_from_config
    from moepack.profile.calib import DEFAULT_MAX_TOKENS, DEFAULT_SEQ_LEN, load_calibration
    from moepack.runtime.model import MoeModel
    from moepack.source import Checkpoint, resolve_source

    t0 = time.perf_counter()
    ckpt = Checkpoint(resolve_source(src), name=str(src))
    spec = spec_from_config(ckpt.config)
    adapter = adapter_for(spec)
    cands = usable_candidates(candidates, spec.expert_shape())
    cal = load_calibration(ckpt.path, calib, seq_len=seq_len or DEFAULT_SEQ_LEN,
                           max_tokens=max_tokens or DEFAULT_MAX_TOKENS, max_position=spec.max_position_embeddings)
    dense = {name: ckpt.read(name) for name in adapter.dense_tensor_names()}
    terms = ExpertTerms.of(spec, dense)
    executor = ProfilingExecutor(ckpt, adapter, spec, cands, max_rows=max_rows, max_channels=max_channels,
                                 try_rtn=try_rtn, progress=progress, terms=terms)
    model = MoeModel(spec, dense, executor, dtype=torch.float32)
    del dense
    if threads is None:
        threads = 1 if spec.expert_shape()[0] * spec.expert_shape()[1] < SMALL_EXPERT else torch.get_num_threads()
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            model.hidden_states(cal.windows)  # all windows advance layer by layer together
        prof = Profile(str(src), spec.family, cal.source, cal.tokens, cands, executor.experts, 0.0,
                       max_channels if max_channels and max_channels < shape_i(spec) else None, executor.drop_error)
        if tune and spec.top_k > 1:
            from moepack.compress import load_expert
            from moepack.profile.tune import TUNE_TOKENS, tune_scale

            rows = max(1, TUNE_TOKENS // cal.windows.shape[1])
            with torch.inference_mode():
                prof.adaptive_scale, prof.tune_curve = tune_scale(
                    model, lambda la, e: {p: t.float() for p, t in load_expert(ckpt, adapter, la, e).items()},
                    spec.num_experts, prof.adaptive_calibration(), cal.windows[:rows], terms=terms)
            if progress:
                progress("tune", 1, 1)
    finally:
        torch.set_num_threads(saved)
    prof.seconds = time.perf_counter() - t0
    return prof
