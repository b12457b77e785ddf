"""One-token decode in two compiled calls per layer: its dense work (`decode_layer`) and its routed experts
(`moe_token`), C++ ops of moepack/kernels/csrc/cpu_layer.cpp.

At one token a layer of the Python forward (`MoeModel.run`) makes many small torch calls (norms,
the q/k/v split, rotary embedding, the KV write, attention, the router's softmax and top-k), each costing far
more than its arithmetic on a small model. `FusedDecode` runs the same steps for a single sequence's single
new token as one call per layer (moepack/kernels/csrc/cpu_layer.cpp), then hands the routed experts to the
model's executor and the shared expert or dense MLP to the model, exactly as the Python forward does. The
Python forward stays the reference: the op differs from it only in float32 summation order, and tests
compare the two on fresh models of every family (tests/test_fused_decode.py).

It applies when all of these hold, else `decode_path` names the reason and every token takes the Python
forward: the CPU with the C++ kernels, float32 compute, a family whose attention and routing the op
implements (`FAMILIES`: softmax routing, SiLU experts), dense weights in float32, bf16 or fp16, and
`MOEPACK_FUSED_DECODE` not set to 0. Per step it is used for one sequence feeding one token with a cache
(decode); prefill and multi-sequence steps take the Python forward.

The streaming executor, for one token, runs all its experts in one `moe_token` call (`experts_one_token`)
when every one is acquired (not streamed past the cache), dense (no FloE keep) and a product the C++ kernels
run (`mix_args`); the op calls the same kernels as the executor's one-by-one loop and sums in the same
order, so the numbers are the same bits. Otherwise, or with `MOEPACK_FUSED_DECODE=0`, the loop runs."""

from __future__ import annotations

import os
from time import perf_counter
from typing import TYPE_CHECKING

import torch

from moepack.codecs.recipe import as_recipe
from moepack.kernels import Backend, resolve_backend
from moepack.kernels._build import CPP
from moepack.kernels.compiled import quant_args
from moepack.runtime.layers import rms_norm
from moepack.runtime.prepared import CLOCK, Projection

if TYPE_CHECKING:
    from moepack.runtime.model import MoeModel, Segment

__all__ = ["FAMILIES", "FusedDecode", "experts_one_token", "experts_op", "fused_decoder", "mix_args"]

FAMILIES = frozenset({"mixtral", "qwen2_moe", "qwen3_moe", "olmoe"})  # what cpu_layer.cpp implements
_QK_NORM = {None: 0, "head": 1, "full": 2}
_WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def unavailable(model: MoeModel) -> str | None:
    """Why the fused op cannot run this model's decode (None: it can)."""
    spec = model.spec
    if _disabled():
        return "disabled by MOEPACK_FUSED_DECODE=0"
    if model.device.type != "cpu":
        return f"the fused op is CPU-only (device {model.device.type})"
    if model.dtype != torch.float32:
        return f"the fused op computes in float32 (compute dtype {str(model.dtype).removeprefix('torch.')})"
    if model.backend is Backend.TORCH:
        return "the TORCH kernel backend was asked for"
    if spec.family not in FAMILIES:
        return f"the fused op does not implement family {spec.family!r}"
    if spec.router_scoring != "softmax" or spec.hidden_act != "silu" or spec.qk_norm not in _QK_NORM:
        return (f"the fused op implements softmax routing, SiLU and qk_norm None/head/full, not "
                f"{spec.router_scoring}/{spec.hidden_act}/{spec.qk_norm}")
    for ops in model.ops:
        for name in ("qkv", "o", "router"):
            if name in ops and ops[name].w.dtype not in _WEIGHT_DTYPES:
                return f"dense weight dtype {ops[name].w.dtype} is not float32, bf16 or fp16"
    if not CPP.available():
        return "the C++ kernels are unavailable"
    return None


def fused_decoder(model: MoeModel) -> tuple[FusedDecode | None, str]:
    """(the fused decoder or None, the decode path in words, for --stats)."""
    why = unavailable(model)
    if why is not None:
        return None, f"Python forward ({why})"
    return FusedDecode(model), "fused C++ layer op"


class FusedDecode:
    """Decodes one token of one sequence through `decode_layer`, one call per layer. The op's per-layer
    arguments are bound once here; the model's executor, hooks and timers are used as the Python forward
    uses them."""

    def __init__(self, model: MoeModel):
        self.model, spec = model, model.spec
        self.op = CPP.load().decode_layer
        self.args: list[tuple] = []
        for layer, (names, ops) in enumerate(zip(model.layers, model.ops, strict=True)):
            w = model.w
            if spec.qk_norm == "head":
                qn, kn = model.head_norms[layer].float().contiguous(), None
            elif spec.qk_norm == "full":
                qn, kn = w[names["q_norm"]].float().contiguous(), w[names["k_norm"]].float().contiguous()
            else:
                qn = kn = None
            router = ops.get("router")
            window = spec.sliding_window_for(layer)
            self.args.append((
                w[names["input_norm"]].float().contiguous(), w[names["post_attn_norm"]].float().contiguous(),
                _matrix(ops["qkv"].w), _vec(ops["qkv"].bias), qn, kn, _QK_NORM[spec.qk_norm],
                float(spec.clip_qkv or 0.0), int(window or 0), _matrix(ops["o"].w), _vec(ops["o"].bias),
                _matrix(router.w) if router is not None else None,
                _vec(router.bias) if router is not None else None,
                spec.top_k, bool(spec.norm_topk_prob), spec.num_heads, spec.num_kv_heads,
                float(spec.rms_norm_eps), float(model.scale)))

    @staticmethod
    def applies(segments: list[Segment]) -> bool:
        """One sequence, one new token, with a float32 cache of batch 1."""
        if len(segments) != 1:
            return False
        seg = segments[0]
        return seg.t == 1 and seg.rows == 1 and seg.cache is not None and seg.cache.batch == 1 \
            and seg.cache.dtype == torch.float32

    def run(self, ids: torch.Tensor, seg: Segment) -> torch.Tensor:
        """ids [1] -> final-normed hidden state [1, H]; the cache advances by one token (as MoeModel.run)."""
        model, spec, cache = self.model, self.model.spec, seg.cache
        cos, sin, _ = model._rope([seg])
        pos = cache.length
        cache.reserve(pos + 1)
        h = model.embed_tokens(ids)
        wall = kernel = 0.0
        op, sparse = self.op, spec.is_sparse
        for layer, args in enumerate(self.args):
            t0, k0 = perf_counter(), CLOCK.s
            for hook in model.layer_hooks:
                hook(layer, h)
            t1 = perf_counter()
            h, x, logits, topk_ids, weights = op(h, cos, sin, cache.k[layer], cache.v[layer], pos, *args)
            CLOCK.s += perf_counter() - t1
            if sparse(layer):
                for hook in model.route_hooks:
                    hook(layer, x, logits, topk_ids, weights)
                out = model.executor.forward(layer, x, topk_ids, weights)
                if "shared_gu" in model.ops[layer]:
                    out = out + model.shared_expert(layer, x)
            else:
                out = model.mlp(layer, x)
            h = h + out
            wall += perf_counter() - t0
            kernel += CLOCK.s - k0
        model.layer_wall_s, model.layer_kernel_s = wall, kernel
        cache.advance(1)
        return rms_norm(h, model.final_norm, spec.rms_norm_eps)


# --- the routed experts of one token ---------------------------------------------------------------------
def experts_op(device: torch.device, backend: Backend):
    """The C++ op `moe_token` (all of a token's routed experts in one call), or None where it does not apply
    (not the CPU, the TORCH backend asked for, MOEPACK_FUSED_DECODE=0, or no C++ kernels)."""
    if device.type != "cpu" or backend is Backend.TORCH or _disabled() or not CPP.available():
        return None
    return CPP.load().moe_token


def _disabled() -> bool:
    return os.environ.get("MOEPACK_FUSED_DECODE", "").strip() == "0"


def mix_args(projs: dict, backend: Backend) -> tuple[list[torch.Tensor], list[int]] | None:
    """(parts, meta) of an expert's gate, up and down for `moe_token`, or None when one of them is a product
    the op does not run (low-rank or N:M terms, a backend other than C++, a passthrough width that is not a
    multiple of 32): that expert takes expert_compute.expert_ffn. Worked out once per set of projections
    (kept on the gate projection)."""
    gate = projs["gate"]
    held = getattr(gate, "mix", False)
    if held is not False:
        return held
    parts: list[torch.Tensor] = []
    meta: list[int] = []
    for name in ("gate", "up", "down"):
        got = _projection_args(projs[name], backend)
        if got is None:
            parts = None
            break
        parts.extend(got[0])
        meta.extend(got[1])
    gate.mix = (parts, meta) if parts is not None else None
    return gate.mix


def _projection_args(proj, backend: Backend) -> tuple[list[torch.Tensor], list[int]] | None:
    if not isinstance(proj, Projection):
        return None
    tensors, recipe, (_, cols) = proj
    recipe = as_recipe(recipe)
    if recipe.rank or recipe.sparse or any(t.device.type != "cpu" for t in tensors.values()):
        return None
    if resolve_backend(backend, recipe, torch.device("cpu")) is not Backend.CPP:
        return None
    if recipe.quantized:  # the same qmatmul ops as the one-by-one path, ragged rows and 8-bit metadata too
        parts = [t for t in quant_args(tensors, torch.device("cpu")) if t is not None]
        return parts, [len(parts) - 2, recipe.bits, recipe.group, cols]
    values = tensors["values"]
    if recipe.dtype not in ("bf16", "fp16") or values.shape[1] % 32 or values.stride(-1) != 1:
        return None
    return [values], [0, 0, 0, cols]


def experts_one_token(ex, layer: int, x: torch.Tensor, order: list[int], views: dict,
                      weight: dict[int, float]) -> torch.Tensor | None:
    """StreamingExecutor.forward's compute for one token in one `moe_token` call: every expert of `order`
    acquired (none bypassed), dense (no FloE keep) and run by the C++ kernels; else None (the executor then
    computes them one by one). Waits, counters and unpinning as the one-by-one loop does them; the sum is
    in expert-id order with the same ops, so the numbers are the same."""
    if x.dtype != torch.float32 or not x.is_contiguous():  # the one-by-one ops convert bf16 per product
        return None
    args = []
    for e in order:
        projs = views.get(e)
        if projs is None or ex.keep_for((layer, e)) is not None:
            return None
        got = mix_args(projs, ex.backend)
        if got is None:
            return None
        args.append((e, got))
    args.sort(key=lambda a: a[0])
    parts: list[torch.Tensor] = []
    meta: list[int] = []
    for _, (p, m) in args:
        parts.extend(p)
        meta.extend(m)
    stats, cache = ex.stats, ex.cache
    for e in order:
        ex._wait((layer, e))
        stats.expert_calls += 1
        stats.expert_tokens += 1
    t0 = perf_counter()
    y = ex.mix_op(x, parts, meta, [weight[e] for e, _ in args])
    CLOCK.s += perf_counter() - t0
    if cache is not None:
        for e in order:
            ex._unpin((layer, e))
    return y.to(x.dtype)


def _matrix(w: torch.Tensor) -> torch.Tensor:
    return w if w.stride(-1) == 1 else w.contiguous()


def _vec(b: torch.Tensor | None) -> torch.Tensor | None:
    return None if b is None else b.float().contiguous()
