"""The lean forward against transformers (fp32, eager attention) on baby checkpoints of every family:
prefill logits, incremental decode with the KV cache, greedy generation, batches, router logits."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES

from moepack.runtime.model import DenseExpertExecutor, MoeModel

transformers = pytest.importorskip("transformers")

TOL = 1e-4  # max abs logit difference, fp32


def hf_model(path):
    return transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager").eval()


def prompt(n: int, seed: int = 0, batch: int | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 512, (batch, n) if batch else (n,), generator=g)


def check_parity(path, n: int = 12, split: int = 7) -> tuple[float, float]:
    hf, ours = hf_model(path), MoeModel.from_checkpoint(path)
    ids = prompt(n)
    with torch.no_grad():
        ref = hf(ids[None]).logits[0]
    full = ours(ids)
    cache = ours.new_cache(capacity=4)  # also exercises growth
    steps = [ours(ids[:split], cache)] + [ours(ids[i:i + 1], cache) for i in range(split, n)]
    inc = torch.cat(steps)
    assert cache.length == n
    d_full, d_inc = (ref - full).abs().max().item(), (ref - inc).abs().max().item()
    assert d_full < TOL and d_inc < TOL, (d_full, d_inc)
    return d_full, d_inc


@pytest.mark.parametrize("fam", FAMILIES)
def test_prefill_and_decode_match_transformers(baby, fam):
    check_parity(baby(fam))


@pytest.mark.parametrize("fam", FAMILIES)
def test_greedy_generation_matches_transformers(baby, fam):
    path = baby(fam)
    hf, ours = hf_model(path), MoeModel.from_checkpoint(path)
    ids = prompt(10, seed=1)
    want = hf.generate(ids[None], max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert ours.greedy(ids, 8) == want[0, 10:].tolist()


def test_batch_of_two(baby):
    path = baby("qwen2_moe")
    hf, ours = hf_model(path), MoeModel.from_checkpoint(path)
    ids = prompt(9, seed=2, batch=2)
    with torch.no_grad():
        ref = hf(ids).logits
    cache = ours.new_cache(batch=2)
    got = torch.cat([ours(ids[:, :6], cache), ours(ids[:, 6:7], cache), ours(ids[:, 7:], cache)], dim=1)
    assert (ref - got).abs().max().item() < TOL


@pytest.mark.parametrize("fam,overrides", [
    ("mixtral", {"tie_word_embeddings": True}),
    ("mixtral", {"sliding_window": 4}),
    ("olmoe", {"clip_qkv": 0.3, "attention_bias": True}),
    ("qwen3_moe", {"decoder_sparse_step": 2, "norm_topk_prob": False, "attention_bias": True}),
    ("qwen2_moe", {"use_sliding_window": True, "sliding_window": 3, "max_window_layers": 2, "norm_topk_prob": True}),
])
def test_config_variants(baby, fam, overrides):
    check_parity(baby(fam, num_hidden_layers=2, **overrides))


def test_bf16_checkpoint_runs_in_fp32(baby):
    path = baby("mixtral", dtype="bfloat16", num_hidden_layers=2)
    check_parity(path)


def test_router_hook_matches_transformers_router_logits(baby):
    path = baby("olmoe")
    hf, ours = hf_model(path), MoeModel.from_checkpoint(path)
    ids = prompt(8, seed=3)
    seen = {}
    ours.route_hooks.append(lambda layer, x, logits, ids_, w: seen.__setitem__(layer, (x, logits, ids_, w)))
    ours(ids)
    with torch.no_grad():
        ref = hf(ids[None], output_router_logits=True).router_logits
    for layer, (x, logits, topk_ids, topk_w) in seen.items():
        assert (logits - ref[layer].reshape(logits.shape)).abs().max().item() < TOL
        assert torch.equal(ours.router_logits(layer, x), logits)
        assert topk_ids.shape == topk_w.shape == (8, ours.spec.top_k)


def test_custom_executor_sees_routed_tokens(baby):
    """The executor interface: called once per sparse layer with x [N,H], ids/weights [N,k]."""
    path = baby("qwen2_moe")
    ref = MoeModel.from_checkpoint(path)
    dense = ref.executor
    calls = []

    class Recording:
        def forward(self, layer, x, topk_ids, topk_weights):
            calls.append((layer, tuple(x.shape), tuple(topk_ids.shape)))
            return dense.forward(layer, x, topk_ids, topk_weights)

    assert isinstance(dense, DenseExpertExecutor)
    ours = MoeModel(ref.spec, ref.w, Recording())
    ids = prompt(5)
    assert torch.equal(ours(ids), ref(ids))
    assert calls == [(0, (5, 128), (5, 2)), (2, (5, 128), (5, 2))]  # layer 1 is a dense MLP
