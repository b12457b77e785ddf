"""`moepack eval`: perplexity and KL(reference || pack); lossless packs match their source exactly."""

from __future__ import annotations

import json
import math

import pytest
from typer.testing import CliRunner

from moepack.cli.app import app
from moepack.compress import compress
from moepack.errors import MoepackError
from moepack.evaluate import evaluate, token_windows

runner = CliRunner()
TEXT = ("Shall I compare thee to a summer's day? Thou art more lovely and more temperate. "
        "Rough winds do shake the darling buds of May, and summer's lease hath all too short a date. ") * 12


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def packs(baby, tmp_path_factory):
    src = baby("mixtral")
    out = tmp_path_factory.mktemp("eval")
    lossless = compress(str(src), out / "lossless.moepack").path
    q2 = compress(str(src), out / "q2.moepack", recipe="q2g64").path
    return src, lossless, q2


def test_token_windows_are_non_overlapping_and_keep_a_usable_tail():
    assert token_windows(list(range(10)), 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert token_windows(list(range(9)), 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]  # a 1-token tail predicts nothing
    with pytest.raises(MoepackError):
        token_windows([1, 2, 3], 1)


def test_lossless_pack_has_zero_kl_and_the_source_perplexity(packs):
    src, lossless, _ = packs
    res = evaluate(lossless, TEXT, reference=str(src), context=128, max_tokens=400, backend="torch")
    assert res.kl == pytest.approx(0.0, abs=1e-9)
    assert res.perplexity == pytest.approx(res.reference_perplexity, rel=1e-9)
    assert res.windows == math.ceil((res.tokens + res.windows) / 128) and res.context == 128
    alone = evaluate(lossless, TEXT, context=128, max_tokens=400, backend="torch")
    assert alone.kl is None and alone.reference_perplexity is None
    assert alone.perplexity == pytest.approx(res.perplexity, rel=1e-12)


def test_a_lossy_pack_moves_away_and_decoded_matches_the_runtime(packs):
    src, _, q2 = packs
    runtime = evaluate(q2, TEXT, reference=str(src), context=128, max_tokens=200, backend="torch")
    decoded = evaluate(q2, TEXT, reference=str(src), context=128, max_tokens=200, decoded=True)
    assert runtime.kl > 1e-5 and runtime.perplexity != runtime.reference_perplexity
    assert runtime.tokens == 199 - 1  # 200 tokens in windows of 128 -> 127 + 71 predicted
    assert decoded.perplexity == pytest.approx(runtime.perplexity, rel=1e-5)
    assert decoded.kl == pytest.approx(runtime.kl, rel=1e-3)


def test_context_is_capped_at_the_models_positions(packs):
    _, lossless, _ = packs
    res = evaluate(lossless, TEXT, context=100000, max_tokens=300, backend="torch")
    assert res.context == 256  # the baby's max_position_embeddings


def test_eval_json_fields_and_errors(packs, tmp_path, monkeypatch):
    src, lossless, _ = packs
    text = tmp_path / "valid.txt"
    text.write_text(TEXT)
    res = runner.invoke(app, ["eval", str(lossless), "--text", str(text), "--reference", str(src), "--json",
                              "--context", "128", "--max-tokens", "300", "--backend", "torch"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output[res.output.index("{"):])
    for field in ("perplexity", "reference_perplexity", "kl", "tokens"):
        assert field in data, field
    assert data["kl"] == pytest.approx(0.0, abs=1e-9) and data["tokens"] > 100
    res = runner.invoke(app, ["eval", str(lossless), "--text", str(text), "--context", "128", "--max-tokens", "200",
                              "--decoded"])
    assert res.exit_code == 0 and "perplexity" in res.output, res.output
    res = runner.invoke(app, ["eval", str(lossless), "--text", str(tmp_path / "missing.txt")])
    assert res.exit_code == 2 and "cannot read" in res.output
    res = runner.invoke(app, ["eval", "no-such-model", "--text", str(text)])
    assert res.exit_code == 2 and "no pack" in res.output


def test_eval_by_model_name_from_the_store_and_a_mismatched_reference(baby, packs, tmp_path, monkeypatch):
    import shutil

    _, lossless, _ = packs
    monkeypatch.setenv("MOEPACK_HOME", str(tmp_path))
    (tmp_path / "packs").mkdir()
    shutil.copytree(lossless, tmp_path / "packs" / "mixtral-8x7b.moepack")
    assert evaluate("mixtral-8x7b", TEXT, max_tokens=64, backend="torch").tokens == 63
    with pytest.raises(MoepackError, match="not the model the pack was made from"):
        evaluate(lossless, TEXT, reference=str(baby("olmoe")), max_tokens=64)
