"""Packs run by the runtime reproduce their source: lossless packs match transformers (an independent
reference) to float tolerance; lossy packs match the pure-torch dequantised weights."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES

from moepack.codecs import decode, parse_recipe
from moepack.compress import compress
from moepack.format import Pack, projection_parts
from moepack.runtime.api import MoePackModel
from moepack.runtime.model import DenseExpertExecutor, MoeModel

PROMPT = "Shall I compare thee to a summer's day? Thou art more lovely"


@pytest.fixture(scope="module")
def packs(baby, tmp_path_factory):
    made = {}

    def get(family: str, recipe: str | None = None):
        key = (family, recipe)
        if key not in made:
            out = tmp_path_factory.mktemp("packs") / f"{family}-{recipe}.moepack"
            made[key] = compress(str(baby(family)), out, recipe=recipe).path
        return made[key]

    return get


@pytest.mark.parametrize("family", FAMILIES)
def test_lossless_pack_matches_transformers(baby, packs, family):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(baby(family), dtype=torch.float32,
                                                           attn_implementation="eager").eval()
    model = MoePackModel.load(packs(family), device="cpu")
    ids = model.encode(PROMPT)
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits[0]
    got = model.logits(ids)
    assert (got - want).abs().max().item() < 1e-4
    greedy_hf = hf.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0, len(ids):].tolist()
    assert model.generate(ids, max_new_tokens=8, stop_at_eos=False).tokens == greedy_hf


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_bf16_pack_keeps_dense_weights_16bit_and_matches_transformers(baby, tmp_path, family):
    """A bf16 checkpoint: dense matrices stay bf16 on the CPU (widened in the kernel, which is exact), the budget
    counts them at 2 bytes, and the logits still match transformers run in float32 on the same weights."""
    transformers = pytest.importorskip("transformers")
    from moepack.kernels import Backend, resolve_backend

    if resolve_backend("auto", "bf16", "cpu") is not Backend.CPP:
        pytest.skip("C++ kernels unavailable: dense weights are upcast instead")
    src = baby(family, dtype="bfloat16")
    pack = compress(str(src), tmp_path / "bf16.moepack", recipe="bf16").path
    hf = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32,
                                                           attn_implementation="eager").eval()
    model = MoePackModel.load(pack, device="cpu", vram="1TB")
    matrices = [t for t in model.model.w.values() if t.dim() == 2]
    assert matrices and all(t.dtype == torch.bfloat16 for t in matrices)
    assert all(t.dtype == torch.float32 for t in model.model.w.values() if t.dim() == 1)
    assert model.budget.dense_bytes == model.model.dense_bytes
    ids = model.encode(PROMPT)
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits[0]
    assert (model.logits(ids) - want).abs().max().item() < 1e-4
    reference = MoePackModel.load(pack, device="cpu", backend="torch")  # the TORCH path upcasts everything
    assert all(t.dtype == torch.float32 for t in reference.model.w.values())
    assert (reference.logits(ids) - want).abs().max().item() < 1e-4


def test_bfloat16_compute_on_the_cpu_is_as_close_as_transformers_bf16(baby, packs):
    """--dtype bfloat16 on the CPU (activations, KV cache and many-token products in bf16): its distance to the
    float32 logits is no more than 1.5x that of transformers run in bfloat16 on the same weights; budgeted ==
    unbudgeted exactly."""
    transformers = pytest.importorskip("transformers")
    from moepack.errors import MoepackError
    from moepack.runtime.api import parse_dtype

    path = packs("mixtral")  # lossless
    exact = MoePackModel.load(path, device="cpu")
    ids = exact.encode(PROMPT * 3)  # long enough for the bf16 GEMM path (> 8 tokens per expert)
    want = exact.logits(ids)
    fast = MoePackModel.load(path, device="cpu", dtype="bfloat16")
    got = fast.logits(ids)
    assert fast.model.dtype == torch.bfloat16 and got.dtype == torch.float32
    hf = transformers.AutoModelForCausalLM.from_pretrained(baby("mixtral"), dtype=torch.bfloat16).eval()
    with torch.no_grad():
        hf_bf16 = hf(torch.tensor([ids])).logits[0].float()

    def dist(a):
        return ((a - want).norm() / want.norm()).item()

    assert 0 < dist(got) <= 1.5 * dist(hf_bf16)
    probe = MoePackModel.load(path, device="cpu", dtype="bf16", vram="1TB")
    budgeted = MoePackModel.load(path, device="cpu", dtype="bf16", vram=probe.budget.vram_for(3))
    assert torch.equal(budgeted.logits(ids), got)
    assert parse_dtype("auto", torch.device("cpu")) == torch.float32
    with pytest.raises(MoepackError, match="unknown compute dtype"):
        parse_dtype("int8", torch.device("cpu"))


def dequantised_reference(pack_path) -> MoeModel:
    """The source architecture with experts replaced by the codec reference's decode of the pack."""
    with Pack(pack_path) as pack:
        weights = {}
        for rec in pack.manifest.experts:
            blob = pack.expert_blob(rec.layer, rec.expert)
            weights[rec.key] = {p: decode(projection_parts(blob, r), parse_recipe(r.recipe), r.shape).clone()
                                for p, r in rec.projections.items()}
        dense = {t: pack.tensor(t).clone() for t in pack.tensor_records}
        return MoeModel(pack.spec, dense, DenseExpertExecutor(weights))


@pytest.mark.parametrize("family,recipe", [("mixtral", "q4g32"), ("qwen2_moe", "q2g64+r8"), ("olmoe", "2:4+q4g32"),
                                           ("qwen3_moe", "q3g32")])
def test_lossy_pack_matches_dequantised_reference(packs, family, recipe, exact_prefill):
    path = packs(family, recipe)
    model = MoePackModel.load(path, device="cpu")
    ids = model.encode(PROMPT)
    want = dequantised_reference(path)(torch.tensor(ids))
    got = model.logits(ids)
    rel = ((got - want).abs().max() / want.abs().max()).item()
    assert rel < 1e-4, rel  # fused kernels accumulate in another order: relative error, not bit equality


@pytest.mark.parametrize("family,recipe", [("mixtral", "q4g32"), ("qwen2_moe", "q2g64+r8"), ("qwen3_moe", "q3g32")])
def test_lossy_prefill_in_bf16_is_as_close_as_bf16_compute(packs, family, recipe, quant_gemm):
    """Quantised products of many tokens in bf16 (MOEPACK_CPU_BF16, on CPUs with bf16 dot products), float32
    everywhere else: the logits are no further from the dequantised float32 reference than 1.5x those of a
    --dtype bfloat16 run of the same pack, and they did change (the bf16 GEMM ran); MOEPACK_CPU_BF16=0 is exact again."""
    from moepack.kernels import compiled

    quant_gemm(None)
    if compiled.quant_gemm()[0] != torch.bfloat16:
        pytest.skip(f"no bf16 prefill here: {compiled.quant_gemm()[1]}")
    path = packs(family, recipe)
    model = MoePackModel.load(path, device="cpu")
    ids = model.encode(PROMPT * 3)  # long enough for the many-token path (> 8 tokens per expert)
    want = dequantised_reference(path)(torch.tensor(ids))
    got = model.logits(ids)
    half = MoePackModel.load(path, device="cpu", dtype="bfloat16").logits(ids)

    def dist(a):
        return ((a - want).norm() / want.norm()).item()

    assert 0 < dist(got) <= 1.5 * dist(half), (dist(got), dist(half))
    quant_gemm("0")
    exact = MoePackModel.load(path, device="cpu")
    assert dist(exact.logits(ids)) < 1e-5


@pytest.mark.parametrize("recipe", [None, "q4g32"])
def test_budgeted_run_equals_unbudgeted_run_and_respects_slots(packs, recipe):
    path = packs("mixtral", recipe)
    free = MoePackModel.load(path, device="cpu")
    ids = free.encode(PROMPT)
    want = free.logits(ids)
    with Pack(path) as p:
        expert = max(e.nbytes for e in p.manifest.experts)
        n_experts = len(p.manifest.experts)
    for slots in (2, 5, n_experts):
        probe = MoePackModel.load(path, device="cpu", vram="1TB", context=128)
        assert probe.budget.slot_bytes == expert
        model = MoePackModel.load(path, device="cpu", vram=probe.budget.vram_for(slots), context=128)
        assert model.budget.slots == slots
        cache = model.executor.cache
        seen = []
        real_allocate = cache.allocate

        def allocate(key, nbytes, _real=real_allocate, _cache=cache, _seen=seen):
            out = _real(key, nbytes)
            _seen.append(len(_cache))
            return out

        cache.allocate = allocate
        assert torch.equal(model.logits(ids), want)
        assert max(seen) <= slots and len(cache) <= slots
        if slots < n_experts:
            assert cache.stats.evictions > 0 and cache.stats.misses > 0
        gen = model.generate(ids, max_new_tokens=6, stop_at_eos=False)
        assert gen.tokens == free.generate(ids, max_new_tokens=6, stop_at_eos=False).tokens
        assert gen.stats.bytes_moved_per_token >= 0 and 0 <= gen.stats.cache_hit_rate <= 1


def test_too_small_budget_states_the_minimum(packs):
    from moepack.errors import BudgetError

    with pytest.raises(BudgetError, match=r"too small: it needs at least [0-9.]+ [KMG]iB"):
        MoePackModel.load(packs("mixtral", "q4g32"), device="cpu", vram="1MB")


def test_damaged_expert_is_reported_on_first_load(packs, tmp_path):
    import shutil

    from moepack.errors import ChecksumError

    path = tmp_path / "bad.moepack"
    shutil.copytree(packs("mixtral", "q4g32"), path)
    with Pack(path) as p:
        rec = p.manifest.experts[-1]
        shard = path / p.manifest.shards[rec.shard].name
    with open(shard, "r+b") as fh:
        fh.seek(rec.offset + 100)
        fh.write(b"\xff\xfe")
    model = MoePackModel.load(path, device="cpu", vram="1TB")
    with pytest.raises(ChecksumError, match=f"expert {rec.layer}.{rec.expert}"):
        for rec_e in range(8):
            model.executor.ensure((rec.layer, rec_e))
