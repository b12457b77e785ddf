"""The lean forward of every supported family (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V2/V3,
GPT-OSS; DeepSeek's latent attention is runtime/mla.py).

The model owns the dense weights (embedding, norms, attention, routers, shared experts, dense MLP layers,
lm_head) and hands the routed experts of each sparse layer to an expert executor:

    executor.forward(layer, x[N, H], topk_ids[N, k], topk_weights[N, k]) -> [N, H]

(N = B*T tokens). `DenseExpertExecutor` holds plain float weights and is the reference; the streaming
executor of the runtime plugs in the same way. Only torch, moepack.arch and moepack.kernels are imported.

Dense weight matrices stored in bf16/fp16 stay in that dtype on the CPU when the C++ kernels are there (half
the memory and half the bytes read per token than float32) and go through the kernels, which widen them to
float32 exactly for a few tokens, and for many tokens multiply in float32 (float32 compute) or with torch's
bf16 GEMM (bfloat16 compute). Every projection is a `prepared.Dense`, built once at load."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path
from time import perf_counter
from typing import Protocol

import torch
import torch.nn.functional as F

from moepack.arch import PROJS, ModelSpec, adapter_for, spec_from_config
from moepack.kernels import Backend, resolve_backend
from moepack.runtime.expert_compute import ExpertTerms
from moepack.runtime.fused_decode import fused_decoder
from moepack.runtime.group_routing import grouped_topk
from moepack.runtime.layers import (
    KVCache,
    apply_rope,
    attend,
    attend_sinks,
    attention_mask,
    rms_norm,
    rope_cos_sin,
    rope_inv_freq,
    signed_sin,
)
from moepack.runtime.mla import MlaAttention, cache_class
from moepack.runtime.prepared import CLOCK, Dense

__all__ = ["DenseExpertExecutor", "KVCache", "MoeModel", "Segment", "storage_dtype", "widens_on"]


class ExpertExecutor(Protocol):
    def forward(self, layer: int, x: torch.Tensor, topk_ids: torch.Tensor,
                topk_weights: torch.Tensor) -> torch.Tensor: ...


def swiglu(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down_cm: torch.Tensor) -> torch.Tensor:
    """Channel-major SwiGLU: gate/up/down_cm all [I, H]; x [N, H] -> [N, H]."""
    return (F.silu(x @ gate.T) * (x @ up.T)) @ down_cm


class DenseExpertExecutor:
    """Routed experts as plain dense weights in the channel-major layout (the parity reference).
    `weights[(layer, expert)] = {"gate": [I,H], "up": [I,H], "down": [I,H] (= w2.T)}`."""

    def __init__(self, weights: Mapping[tuple[int, int], Mapping[str, torch.Tensor]],
                 terms: ExpertTerms | None = None):
        self.weights, self.terms = weights, terms  # terms: the family's expert biases and nonlinearity

    @classmethod
    def from_tensors(cls, spec: ModelSpec, tensors: Mapping[str, torch.Tensor], *,
                     dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> DenseExpertExecutor:
        """Slice every expert out of a mapping of on-disk tensors (by Hugging Face name)."""
        names = adapter_for(spec)
        weights = {}
        for layer in spec.sparse_layer_ids:
            for e in range(spec.num_experts):
                weights[(layer, e)] = {
                    p: (r := names.expert_tensor_ref(layer, e, p)).extract(tensors[r.name], tensors.get(r.scales))
                    .to(device=device, dtype=dtype).contiguous()
                    for p in PROJS
                }
        return cls(weights, ExpertTerms.of(spec, tensors, dtype=dtype, device=device))

    def forward(self, layer: int, x: torch.Tensor, topk_ids: torch.Tensor,
                topk_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        for e in topk_ids.unique().tolist():
            tok, slot = (topk_ids == e).nonzero(as_tuple=True)
            w, xs = self.weights[(layer, e)], x[tok]
            if self.terms is None:
                y = swiglu(xs, w["gate"], w["up"], w["down"])  # [n, H]
            else:
                h = self.terms.gate_act((layer, e), xs @ w["gate"].T) * self.terms.up_factor((layer, e), xs @ w["up"].T)
                y = self.terms.out((layer, e), h @ w["down"])
            out.index_add_(0, tok, y * topk_weights[tok, slot, None].to(y.dtype))
        return out


_WIDE = {torch.bfloat16: "bf16", torch.float16: "fp16"}


def widens_on(device: torch.device, dtype: torch.dtype, backend: Backend | str = Backend.AUTO) -> bool:
    """Whether 16-bit dense matrices stay 16-bit: float32 or bfloat16 compute on the CPU with the C++ kernels."""
    return (device.type == "cpu" and dtype in (torch.float32, torch.bfloat16)
            and Backend.parse(backend) is not Backend.TORCH
            and resolve_backend(backend, "bf16", device) is Backend.CPP)


def storage_dtype(stored: torch.dtype, ndim: int, dtype: torch.dtype, widen: bool) -> torch.dtype:
    """The dtype a dense tensor is held in: a 16-bit matrix stays 16-bit where a kernel widens it on the fly
    (`widen`, from `widens_on`), everything else is converted to the compute dtype."""
    return stored if widen and ndim == 2 and stored in _WIDE else dtype



RouteHook = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]
LayerHook = Callable[[int, torch.Tensor], None]


@dataclass(frozen=True)
class Segment:
    """A run of consecutive rows of the token stream: `rows` sequences (sharing `cache`, one row each of its
    batch) of `t` new tokens each, at positions start..start+t-1. Row-major: sequence r's tokens come first."""

    cache: KVCache | None
    start: int
    rows: int
    t: int

    @property
    def tokens(self) -> int:
        return self.rows * self.t


class MoeModel:
    """Lean decoder forward. `tensors` maps Hugging Face names to tensors (any dtype, possibly mmap-backed);
    the dense ones are copied once into their storage dtype on `device` (q/k/v, and gate/up of dense MLPs and
    shared experts, side by side in one matrix each: one product instead of three or two); experts are never
    read from `tensors`.

    The forward runs a *token stream*: the new tokens of any number of sequences stacked as [N, H]; norms,
    projections, routing and the experts run once over the stack, and only rotary positions, KV caches and
    the attention core are per sequence (`Segment`). A prompt is a stream of one segment; the engine
    (runtime/engine.py) stacks every sequence in flight.

    Hooks (for profiling and prefetching): `route_hooks` get (layer, x[N,H] router input, logits[N,E] float32,
    topk_ids[N,k], topk_weights[N,k]); `layer_hooks` get (layer, hidden[N,H]) at the start of each layer.
    After each forward, `layer_wall_s` and `layer_kernel_s` hold the wall time of its layers and the part of
    it spent inside kernels and copies (prepared.CLOCK)."""

    def __init__(self, spec: ModelSpec, tensors: Mapping[str, torch.Tensor], executor: ExpertExecutor, *,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 backend: Backend | str = Backend.AUTO):
        self.spec, self.executor, self.dtype, self.device = spec, executor, dtype, torch.device(device)
        self.backend = Backend.parse(backend)
        self.widen = widens_on(self.device, dtype, self.backend)  # 16-bit matrices through the kernels
        self.names = adapter_for(spec)
        self.w: dict[str, torch.Tensor] = {}
        self._fused: dict[str, torch.Tensor] = {}
        self.layers = [self.names.layer_tensor_names(i) for i in range(spec.num_layers)]
        fused = {("q", "k", "v"): "qkv", ("mlp_gate", "mlp_up"): "mlp_gu", ("shared_gate", "shared_up"): "shared_gu",
                 ("q_a", "kv_a"): "q_kv_a", ("mla_q", "kv_a"): "q_kv_a"}  # MLA: [q | latent + rope key]
        for n in self.layers:  # matrices applied to the same input are stored side by side, as views of one
            for roles in fused:
                if roles[0] in n:
                    self._fuse(tensors, [n[r] for r in roles])
        for name in self.names.dense_tensor_names():
            if name not in self.w:
                self.w[name] = self._keep(tensors[name])
        g = self.names.global_tensor_names()
        self.embed = self.w[g["embed"]]
        self.final_norm = self.w[g["final_norm"]]
        self.lm_head = self.w[g["lm_head"]] if "lm_head" in g else self.embed
        self.head = self.dense(self.lm_head)
        self.ops: list[dict[str, Dense]] = []
        for n in self.layers:
            ops = {}
            for roles, op in fused.items():
                if roles[0] in n:
                    bias = [n.get(f"{r}_bias") for r in roles]
                    b = torch.cat([self.w[x] for x in bias]) if all(bias) else None
                    ops[op] = self.dense(self._joined([n[r] for r in roles]), b)
            ops["o"] = self.dense(self.w[n["o"]], self.w.get(n.get("o_bias", "")))
            for role in ("router", "mlp_down", "shared_down", "shared_expert_gate", "q_b"):
                if role in n:
                    ops[role] = self.dense(self.w[n[role]], self.w.get(n.get(f"{role}_bias", "")))
            self.ops.append(ops)
        self.scale = spec.head_dim ** -0.5
        self.mla = MlaAttention(self) if spec.kv_lora_rank else None  # DeepSeek's latent attention
        self.score_bias = [tensors[n["router_score_bias"]].float().to(self.device) if "router_score_bias" in n
                           else None for n in self.layers]  # V3's selection bias, float32 as transformers keeps it
        self.head_norms = [torch.cat((self.w[n["q_norm"]].expand(spec.num_heads, -1),
                                      self.w[n["k_norm"]].expand(spec.num_kv_heads, -1)))
                           if spec.qk_norm == "head" else None for n in self.layers]  # [nh + nkv, d]
        self.inv_freq, self.rope_scaling = rope_inv_freq(spec.rope, spec.head_dim, spec.max_position_embeddings)
        self._dynamic_len = spec.max_position_embeddings  # longest sequence the dynamic rope was built for
        self._rope_table: tuple[torch.Tensor, ...] | None = None
        self.route_hooks: list[RouteHook] = []
        self.layer_hooks: list[LayerHook] = []
        self.layer_wall_s = self.layer_kernel_s = 0.0
        self.fused, self.decode_path = fused_decoder(self)  # one-token decode in one C++ call per layer

    # --- construction helpers ----------------------------------------------------------------------
    def _keep(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(device=self.device, dtype=storage_dtype(t.dtype, t.dim(), self.dtype, self.widen)).contiguous()

    def _fuse(self, tensors: Mapping[str, torch.Tensor], names: list[str]) -> None:
        """One matrix of the `names` matrices side by side; each name keeps a view of its rows."""
        joined = self._keep(torch.cat([self._keep(tensors[x]) for x in names]))
        self._fused[names[0]] = joined
        row = 0
        for x in names:
            n = tensors[x].shape[0]
            self.w[x] = joined[row: row + n]
            row += n

    def _joined(self, names: list[str]) -> torch.Tensor:
        return self._fused[names[0]]

    def dense(self, w: torch.Tensor, bias: torch.Tensor | None = None) -> Dense:
        return Dense(w, bias, widen=self.widen, backend=self.backend)

    @classmethod
    def from_checkpoint(cls, path: str | Path, *, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu", executor: ExpertExecutor | None = None) -> MoeModel:
        """A Hugging Face checkpoint folder, experts dense in memory unless an executor is given
        (small models and references only: every expert is materialised in `dtype`)."""
        from safetensors import safe_open

        path = Path(path)
        spec = spec_from_config(json.loads((path / "config.json").read_text()))
        tensors: dict[str, torch.Tensor] = {}
        for f in sorted(path.glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as fh:
                for name in fh.keys():  # noqa: SIM118 - safe_open is not a mapping
                    tensors[name] = fh.get_tensor(name)
        if executor is None:
            executor = DenseExpertExecutor.from_tensors(spec, tensors, dtype=dtype, device=device)
        return cls(spec, tensors, executor, dtype=dtype, device=device)

    @property
    def dense_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.w.values())

    def linear(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """x [..., in] @ w.T for a dense weight w [out, in] (in the compute dtype, or 16-bit: see module doc)."""
        return (self.head if w is self.lm_head else self.dense(w))(x)

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """Embedding rows of token ids, in the compute dtype."""
        return self.embed[ids.to(self.device)].to(self.dtype)

    def new_cache(self, capacity: int = 256, batch: int = 1) -> KVCache:
        return cache_class(self.spec)(self.spec, capacity=capacity, batch=batch, dtype=self.dtype,
                                      device=self.device)

    # --- router --------------------------------------------------------------------------------------
    def router_logits(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """Router logits [N, E] of a sparse layer for (post-attention-normed) hidden states x [N, H]."""
        return self.ops[layer]["router"](x)

    def route(self, layer: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits [N,E], topk_ids [N,k], topk_weights [N,k]): softmax over all experts in float32, top-k,
        renormalised to sum 1 when the family does (Mixtral always, Qwen/OLMoE when norm_topk_prob); DeepSeek's
        grouped softmax / sigmoid routers in group_routing.py."""
        logits = self.router_logits(layer, x)
        if self.spec.router_scoring == "topk_softmax":  # GPT-OSS: top-k of the logits, softmax over those
            top, ids = torch.topk(logits.float(), self.spec.top_k, dim=-1)
            return logits, ids, torch.softmax(top, dim=-1).to(x.dtype)
        if self.spec.group_scoring is not None or self.spec.router_scoring == "sigmoid" \
                or self.spec.routed_scaling_factor != 1.0:  # DeepSeek's routers (runtime/group_routing.py)
            ids, weights = grouped_topk(logits, self.spec, self.score_bias[layer])
            return logits, ids, weights.to(x.dtype)
        probs = torch.softmax(logits.float(), dim=-1)
        weights, ids = torch.topk(probs, self.spec.top_k, dim=-1)
        if self.spec.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return logits, ids, weights.to(x.dtype)

    # --- blocks ----------------------------------------------------------------------------------------
    def attention(self, layer: int, x: torch.Tensor, rope: tuple[torch.Tensor, ...],
                  segments: list[Segment]) -> torch.Tensor:
        """x [N, H] (normed) -> attention output [N, H]; rope = (cos, sin, signed sin) [N, 1, r] per row."""
        if self.mla is not None:
            return self.mla.forward(layer, x, rope, segments)
        spec, w, n = self.spec, self.w, self.layers[layer]
        nh, nkv, d = spec.num_heads, spec.num_kv_heads, spec.head_dim
        qkv = self.ops[layer]["qkv"](x)  # [N, (nh + 2 nkv) d]
        if spec.qk_norm == "full":  # OLMoE: over the whole projection
            q, k, v = qkv.split((nh * d, nkv * d, nkv * d), dim=-1)
            q = rms_norm(q, w[n["q_norm"]], spec.rms_norm_eps)
            k = rms_norm(k, w[n["k_norm"]], spec.rms_norm_eps)
            qkv = torch.cat((q, k, v), dim=-1)
        if spec.clip_qkv is not None:
            qkv = qkv.clamp(-spec.clip_qkv, spec.clip_qkv)
        qk = qkv[:, : (nh + nkv) * d].view(-1, nh + nkv, d)  # q and k heads side by side
        if spec.qk_norm == "head":  # Qwen3: per head over head_dim
            qk = _head_norm(qk, self.head_norms[layer], spec.rms_norm_eps)
        qk = apply_rope(qk, *rope).transpose(0, 1)[None]  # [1, nh + nkv, N, d]
        q, k = qk[:, :nh], qk[:, nh:]
        v = qkv[:, (nh + nkv) * d:].view(-1, nkv, d).transpose(0, 1)[None]  # [1, nkv, N, d]
        window, outs, row = spec.sliding_window_for(layer), [], 0
        for seg in segments:
            a, row = row, row + seg.tokens
            qs, ks, vs = (q, k, v) if len(segments) == 1 else (q[:, :, a:row], k[:, :, a:row], v[:, :, a:row])
            if seg.rows > 1:  # [1, h, b*t, d] -> [b, h, t, d]
                qs, ks, vs = (z[0].reshape(z.shape[1], seg.rows, seg.t, d).transpose(0, 1) for z in (qs, ks, vs))
            if seg.cache is not None:
                ks, vs = seg.cache.update(layer, ks, vs)
            mask = attention_mask(seg.start, seg.t, ks.shape[2], window, x.device)
            t0 = perf_counter()
            if spec.attention_sinks:  # GPT-OSS: a per-head logit in the softmax denominator
                o = attend_sinks(qs, ks, vs, mask, self.scale, w[n["sinks"]])
            else:
                o = attend(qs, ks, vs, mask, self.scale)  # [b, t, nh*d]
            CLOCK.s += perf_counter() - t0
            outs.append(o.view(seg.tokens, -1))
        return self.ops[layer]["o"](outs[0] if len(outs) == 1 else torch.cat(outs))

    def mlp(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """x [N, H] -> [N, H]: routed experts (+ gated shared expert) or the dense MLP."""
        ops = self.ops[layer]
        if not self.spec.is_sparse(layer):
            return ops["mlp_down"](_silu_mul(ops["mlp_gu"](x)))
        logits, ids, weights = self.route(layer, x)
        for hook in self.route_hooks:
            hook(layer, x, logits, ids, weights)
        out = self.executor.forward(layer, x, ids, weights)
        if "shared_gu" in ops:
            out = out + self.shared_expert(layer, x)
        return out

    def shared_expert(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """The shared expert of a sparse layer, x [N, H] -> [N, H]: gated by sigmoid(x . gate) in Qwen2-MoE,
        ungated in DeepSeek."""
        ops = self.ops[layer]
        shared = ops["shared_down"](_silu_mul(ops["shared_gu"](x)))
        if "shared_expert_gate" not in ops:
            return shared
        return torch.sigmoid(ops["shared_expert_gate"](x)) * shared

    def _rope(self, segments: list[Segment]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(cos, sin, signed sin) [N, 1, r] for every row of the stream, read from a table of positions that
        grows by doubling (the same numbers as computing them per position)."""
        spec, longest = self.spec, max(s.start + s.t for s in segments)
        if spec.rope.type == "dynamic":  # transformers regrows the frequencies past the trained length
            if longest > self._dynamic_len or (longest < spec.max_position_embeddings
                                               and self._dynamic_len > spec.max_position_embeddings):
                self._dynamic_len = max(longest, spec.max_position_embeddings)
                self.inv_freq, self.rope_scaling = rope_inv_freq(
                    spec.rope, spec.head_dim, spec.max_position_embeddings, seq_len=self._dynamic_len)
                self._rope_table = None
        table = self._rope_table
        if table is None or table[0].shape[0] < longest:
            size = max(256, 1 << (longest - 1).bit_length())
            cos, sin = rope_cos_sin(self.inv_freq, torch.arange(size, device=self.device), self.rope_scaling,
                                    self.dtype)
            table = self._rope_table = (cos[:, None], sin[:, None], signed_sin(sin)[:, None])
        if len(segments) == 1 and segments[0].rows == 1:
            a, b = segments[0].start, segments[0].start + segments[0].t
            return table[0][a:b], table[1][a:b], table[2][a:b]
        pos = [torch.arange(s.start, s.start + s.t).repeat(s.rows) for s in segments]
        index = torch.cat(pos).to(self.device)
        return tuple(t.index_select(0, index) for t in table)

    # --- forward ---------------------------------------------------------------------------------------
    def run(self, ids: torch.Tensor, segments: list[Segment]) -> torch.Tensor:
        """The token stream ids [N] (segments in order) -> final-normed hidden states [N, H]. Each segment's
        cache advances by its tokens."""
        if self.fused is not None and self.fused.applies(segments):  # runtime/fused_decode.py
            return self.fused.run(ids, segments[0])
        spec = self.spec
        rope = self._rope(segments)  # per row [N, 1, r], broadcast over heads
        h = self.embed_tokens(ids)  # [N, H]
        wall = kernel = 0.0
        for layer in range(spec.num_layers):
            t0, k0 = perf_counter(), CLOCK.s
            for hook in self.layer_hooks:
                hook(layer, h)
            n = self.layers[layer]
            x = rms_norm(h, self.w[n["input_norm"]], spec.rms_norm_eps)
            h = h + self.attention(layer, x, rope, segments)
            x = rms_norm(h, self.w[n["post_attn_norm"]], spec.rms_norm_eps)
            h = h + self.mlp(layer, x)
            wall += perf_counter() - t0
            kernel += CLOCK.s - k0
        self.layer_wall_s, self.layer_kernel_s = wall, kernel
        for s in segments:
            if s.cache is not None:
                s.cache.advance(s.t)
        return rms_norm(h, self.final_norm, spec.rms_norm_eps)

    def hidden_states(self, input_ids: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Final-normed hidden states [B, T, H] for token ids [B, T] following the cache's tokens."""
        b, t = input_ids.shape
        seg = Segment(cache, cache.length if cache is not None else 0, b, t)
        return self.run(input_ids.reshape(-1), [seg]).view(b, t, -1)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None, *,
                last_only: bool = False) -> torch.Tensor:
        """Logits for token ids [T] (-> [T, V]) or [B, T] (-> [B, T, V]). With a cache the tokens continue
        the cached sequence (prefill: T tokens; decode: 1); `last_only` computes only the last position."""
        ids = torch.as_tensor(input_ids, dtype=torch.long)
        flat = ids.dim() == 1
        if flat:
            ids = ids[None]
        h = self.hidden_states(ids, cache)
        if last_only:
            h = h[:, -1:]
        logits = self.head(h)
        return logits[0] if flat else logits

    __call__ = forward

    @torch.inference_mode()
    def forward_many(self, feeds: list[list[int]], caches: list[KVCache]) -> torch.Tensor:
        """One step of several sequences: feeds[i] (its next tokens) continues caches[i]. Returns the logits
        at each feed's last token [S, V]."""
        segments = [Segment(c, c.length, 1, len(f)) for f, c in zip(feeds, caches, strict=True)]
        ids = torch.tensor([t for f in feeds for t in f], dtype=torch.long)
        h = self.run(ids, segments)
        if len(feeds) > 1 or len(feeds[0]) > 1:
            h = h[torch.tensor(list(accumulate(len(f) for f in feeds)), device=h.device) - 1]
        return self.head(h)

    @torch.inference_mode()
    def greedy(self, prompt_ids: list[int] | torch.Tensor, max_new_tokens: int,
               cache: KVCache | None = None) -> list[int]:
        """Greedy continuation (prefill the prompt, then decode token by token); returns the new ids."""
        ids = torch.as_tensor(prompt_ids, dtype=torch.long).flatten()
        cache = cache if cache is not None else self.new_cache(capacity=len(ids) + max_new_tokens)
        out: list[int] = []
        logits = self.forward(ids, cache, last_only=True)
        for _ in range(max_new_tokens):
            nxt = int(logits[-1].argmax())
            out.append(nxt)
            if len(out) == max_new_tokens:
                break
            logits = self.forward(torch.tensor([nxt]), cache)
        return out


def _head_norm(qk: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Qwen3's per-head RMSNorm of q and k heads side by side: qk [N, nh + nkv, d], weight [nh + nkv, d]."""
    if qk.dtype == torch.float32:
        return torch.rms_norm(qk, (qk.shape[-1],), None, eps) * weight
    return rms_norm(qk, weight, eps)


def _silu_mul(gu: torch.Tensor) -> torch.Tensor:
    """SwiGLU's inner product on a side-by-side [gate | up] projection [N, 2I] -> [N, I]."""
    g, u = gu.chunk(2, dim=-1)
    return F.silu(g) * u
