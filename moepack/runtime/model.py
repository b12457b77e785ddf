"""The lean forward of every supported family (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE).

The model owns the dense weights (embedding, norms, attention, routers, shared experts, dense MLP layers,
lm_head) and hands the routed experts of each sparse layer to an expert executor:

    executor.forward(layer, x[N, H], topk_ids[N, k], topk_weights[N, k]) -> [N, H]

(N = B*T tokens). `DenseExpertExecutor` holds plain float weights and is the reference; the streaming
executor of the runtime plugs in the same way. Only torch, moepack.arch and moepack.kernels are imported.

Dense weight matrices stored in bf16/fp16 stay in that dtype on the CPU when the C++ kernels are there (half
the memory and half the bytes read per token than float32) and go through the kernels, which widen them to
float32 exactly for a few tokens, and for many tokens multiply in float32 (float32 compute) or with torch's
bf16 GEMM (bfloat16 compute); `linear` is the one place every projection goes through."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F

from moepack.arch import PROJS, ModelSpec, adapter_for, spec_from_config
from moepack.kernels import Backend, matmul, resolve_backend
from moepack.runtime.layers import apply_rope, attend, attention_mask, rms_norm, rope_cos_sin, rope_inv_freq


class ExpertExecutor(Protocol):
    def forward(self, layer: int, x: torch.Tensor, topk_ids: torch.Tensor,
                topk_weights: torch.Tensor) -> torch.Tensor: ...


def swiglu(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down_cm: torch.Tensor) -> torch.Tensor:
    """Channel-major SwiGLU: gate/up/down_cm all [I, H]; x [N, H] -> [N, H]."""
    return (F.silu(x @ gate.T) * (x @ up.T)) @ down_cm


class DenseExpertExecutor:
    """Routed experts as plain dense weights in the channel-major layout (the parity reference).
    `weights[(layer, expert)] = {"gate": [I,H], "up": [I,H], "down": [I,H] (= w2.T)}`."""

    def __init__(self, weights: Mapping[tuple[int, int], Mapping[str, torch.Tensor]]):
        self.weights = weights

    @classmethod
    def from_tensors(cls, spec: ModelSpec, tensors: Mapping[str, torch.Tensor], *,
                     dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> DenseExpertExecutor:
        """Slice every expert out of a mapping of on-disk tensors (by Hugging Face name)."""
        names = adapter_for(spec)
        weights = {}
        for layer in spec.sparse_layer_ids:
            for e in range(spec.num_experts):
                weights[(layer, e)] = {
                    p: (r := names.expert_tensor_ref(layer, e, p)).extract(tensors[r.name])
                    .to(device=device, dtype=dtype).contiguous()
                    for p in PROJS
                }
        return cls(weights)

    def forward(self, layer: int, x: torch.Tensor, topk_ids: torch.Tensor,
                topk_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        for e in topk_ids.unique().tolist():
            tok, slot = (topk_ids == e).nonzero(as_tuple=True)
            w = self.weights[(layer, e)]
            y = swiglu(x[tok], w["gate"], w["up"], w["down"])  # [n, H]
            out.index_add_(0, tok, y * topk_weights[tok, slot, None].to(y.dtype))
        return out


class KVCache:
    """Keys and values of every layer, preallocated for `capacity` tokens (grows by doubling if exceeded).
    k/v of layer l: [B, n_kv_heads, capacity, head_dim]; `length` tokens are valid."""

    def __init__(self, spec: ModelSpec, *, capacity: int = 256, batch: int = 1,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        self.spec, self.batch, self.dtype, self.device = spec, batch, dtype, torch.device(device)
        shape = (batch, spec.num_kv_heads, capacity, spec.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(spec.num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(spec.num_layers)]
        self.length = 0

    @staticmethod
    def bytes_per_token(spec: ModelSpec, dtype: torch.dtype = torch.float32, batch: int = 1) -> int:
        item = torch.empty((), dtype=dtype).element_size()
        return 2 * spec.num_layers * batch * spec.num_kv_heads * spec.head_dim * item

    @property
    def capacity(self) -> int:
        return self.k[0].shape[2]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def reset(self) -> None:
        self.length = 0

    def crop(self, length: int) -> None:
        """Forget every token from `length` on."""
        self.length = min(self.length, length)

    def _grow(self, needed: int) -> None:
        cap = max(needed, 2 * self.capacity)
        for lst in (self.k, self.v):
            for i, t in enumerate(lst):
                new = t.new_zeros((*t.shape[:2], cap, t.shape[3]))
                new[:, :, : self.length] = t[:, :, : self.length]
                lst[i] = new

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k/v [B, nkv, T, d] at positions length..length+T-1; return all valid k/v of the layer.
        `length` advances only through `advance` (once per forward, after the last layer)."""
        end = self.length + k.shape[2]
        if end > self.capacity:
            self._grow(end)
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, t: int) -> None:
        self.length += t


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


class MoeModel:
    """Lean decoder forward. `tensors` maps Hugging Face names to tensors (any dtype, possibly mmap-backed);
    the dense ones are copied once into `dtype` on `device`; experts are never read from `tensors`.

    Hooks (for profiling and prefetching): `route_hooks` get (layer, x[N,H] router input, logits[N,E] float32,
    topk_ids[N,k], topk_weights[N,k]); `layer_hooks` get (layer, hidden[N,H]) at the start of each layer."""

    def __init__(self, spec: ModelSpec, tensors: Mapping[str, torch.Tensor], executor: ExpertExecutor, *,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 backend: Backend | str = Backend.AUTO):
        self.spec, self.executor, self.dtype, self.device = spec, executor, dtype, torch.device(device)
        self.backend = Backend.parse(backend)
        self.widen = widens_on(self.device, dtype, self.backend)  # 16-bit matrices through the kernels
        self.names = adapter_for(spec)
        self.w: dict[str, torch.Tensor] = {}
        for name in self.names.dense_tensor_names():
            t = tensors[name]
            keep = storage_dtype(t.dtype, t.dim(), dtype, self.widen)
            self.w[name] = t.to(device=self.device, dtype=keep).contiguous()
        g = self.names.global_tensor_names()
        self.embed = self.w[g["embed"]]
        self.final_norm = self.w[g["final_norm"]]
        self.lm_head = self.w[g["lm_head"]] if "lm_head" in g else self.embed
        self.layers = [self.names.layer_tensor_names(i) for i in range(spec.num_layers)]
        self.scale = spec.head_dim ** -0.5
        self.inv_freq, self.rope_scaling = rope_inv_freq(spec.rope, spec.head_dim, spec.max_position_embeddings)
        self._dynamic_len = spec.max_position_embeddings  # longest sequence the dynamic rope was built for
        self.route_hooks: list[RouteHook] = []
        self.layer_hooks: list[LayerHook] = []

    # --- construction helpers ----------------------------------------------------------------------
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
        if not (self.widen and w.dtype in _WIDE):
            return x @ w.T
        flat = x.reshape(-1, x.shape[-1])
        out = matmul(flat, {"values": w}, _WIDE[w.dtype], tuple(w.shape), backend=self.backend)
        return out.view(*x.shape[:-1], w.shape[0])

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """Embedding rows of token ids, in the compute dtype."""
        return self.embed[ids.to(self.device)].to(self.dtype)

    def new_cache(self, capacity: int = 256, batch: int = 1) -> KVCache:
        return KVCache(self.spec, capacity=capacity, batch=batch, dtype=self.dtype, device=self.device)

    # --- router --------------------------------------------------------------------------------------
    def router_logits(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """Router logits [N, E] of a sparse layer for (post-attention-normed) hidden states x [N, H]."""
        names = self.layers[layer]
        logits = self.linear(x, self.w[names["router"]])
        if "router_bias" in names:
            logits = logits + self.w[names["router_bias"]]
        return logits

    def route(self, layer: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits [N,E], topk_ids [N,k], topk_weights [N,k]): softmax over all experts in float32, top-k,
        renormalised to sum 1 when the family does (Mixtral always, Qwen/OLMoE when norm_topk_prob)."""
        logits = self.router_logits(layer, x)
        probs = torch.softmax(logits.float(), dim=-1)
        weights, ids = torch.topk(probs, self.spec.top_k, dim=-1)
        if self.spec.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return logits, ids, weights.to(x.dtype)

    # --- blocks ----------------------------------------------------------------------------------------
    def _attention(self, layer: int, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   cache: KVCache | None, start: int) -> torch.Tensor:
        spec, w, n = self.spec, self.w, self.layers[layer]
        b, t, _ = x.shape
        q, k, v = self.linear(x, w[n["q"]]), self.linear(x, w[n["k"]]), self.linear(x, w[n["v"]])
        if spec.qkv_bias:
            q, k, v = q + w[n["q_bias"]], k + w[n["k_bias"]], v + w[n["v_bias"]]
        if spec.qk_norm == "full":  # OLMoE: over the whole projection
            q = rms_norm(q, w[n["q_norm"]], spec.rms_norm_eps)
            k = rms_norm(k, w[n["k_norm"]], spec.rms_norm_eps)
        if spec.clip_qkv is not None:
            c = spec.clip_qkv
            q, k, v = q.clamp(-c, c), k.clamp(-c, c), v.clamp(-c, c)
        q = q.view(b, t, spec.num_heads, spec.head_dim)
        k = k.view(b, t, spec.num_kv_heads, spec.head_dim)
        v = v.view(b, t, spec.num_kv_heads, spec.head_dim)
        if spec.qk_norm == "head":  # Qwen3: per head over head_dim
            q = rms_norm(q, w[n["q_norm"]], spec.rms_norm_eps)
            k = rms_norm(k, w[n["k_norm"]], spec.rms_norm_eps)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, T, d]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        mask = attention_mask(start, t, k.shape[2], spec.sliding_window_for(layer), x.device)
        out = attend(q, k, v, mask, self.scale)  # [B, T, nh*d]
        out = self.linear(out, w[n["o"]])
        if spec.o_bias:
            out = out + w[n["o_bias"]]
        return out

    def _mlp(self, layer: int, x: torch.Tensor, run_experts: Callable | None = None) -> torch.Tensor:
        """x [N, H] -> [N, H]: routed experts (+ gated shared expert) or the dense MLP. `run_experts` (default
        `executor.forward`) lets the throughput engine run the routed experts its own way."""
        w, n, lin = self.w, self.layers[layer], self.linear
        if not self.spec.is_sparse(layer):
            return lin(F.silu(lin(x, w[n["mlp_gate"]])) * lin(x, w[n["mlp_up"]]), w[n["mlp_down"]])
        logits, ids, weights = self.route(layer, x)
        for hook in self.route_hooks:
            hook(layer, x, logits, ids, weights)
        out = (run_experts or self.executor.forward)(layer, x, ids, weights)
        if "shared_gate" in n:
            out = out + self.shared_expert(layer, x)
        return out

    def shared_expert(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """Qwen2-MoE's gated shared expert of a sparse layer, x [N, H] -> [N, H]."""
        w, n, lin = self.w, self.layers[layer], self.linear
        shared = lin(F.silu(lin(x, w[n["shared_gate"]])) * lin(x, w[n["shared_up"]]), w[n["shared_down"]])
        return torch.sigmoid(lin(x, w[n["shared_expert_gate"]])) * shared

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        spec = self.spec
        if spec.rope.type == "dynamic":  # transformers regrows the frequencies past the trained length
            seq = int(positions.max()) + 1
            if seq > self._dynamic_len or (seq < spec.max_position_embeddings
                                           and self._dynamic_len > spec.max_position_embeddings):
                self._dynamic_len = max(seq, spec.max_position_embeddings)
                self.inv_freq, self.rope_scaling = rope_inv_freq(
                    spec.rope, spec.head_dim, spec.max_position_embeddings, seq_len=self._dynamic_len)
        return rope_cos_sin(self.inv_freq, positions, self.rope_scaling, self.dtype)

    # --- forward ---------------------------------------------------------------------------------------
    def hidden_states(self, input_ids: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Final-normed hidden states [B, T, H] for token ids [B, T] following the cache's tokens."""
        spec = self.spec
        b, t = input_ids.shape
        start = cache.length if cache is not None else 0
        positions = torch.arange(start, start + t, device=self.device)
        cos, sin = self._rope(positions)
        h = self.embed_tokens(input_ids)  # [B, T, H]
        for layer in range(spec.num_layers):
            for hook in self.layer_hooks:
                hook(layer, h.view(b * t, -1))
            n = self.layers[layer]
            x = rms_norm(h, self.w[n["input_norm"]], spec.rms_norm_eps)
            h = h + self._attention(layer, x, cos, sin, cache, start)
            x = rms_norm(h, self.w[n["post_attn_norm"]], spec.rms_norm_eps)
            h = h + self._mlp(layer, x.view(b * t, -1)).view(b, t, -1)
        if cache is not None:
            cache.advance(t)
        return rms_norm(h, self.final_norm, spec.rms_norm_eps)

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
        logits = self.linear(h, self.lm_head)
        return logits[0] if flat else logits

    __call__ = forward

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
