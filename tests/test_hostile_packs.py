"""Packs damaged on disk, before or while a run uses them (issue 15, items 6-9): every outcome is a typed
MoepackError naming the file, never a hang, a signal, another exception type or a run on damaged weights."""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from moepack.arch import spec_from_config
from moepack.cli.app import app
from moepack.errors import (
    ChecksumError,
    ManifestError,
    ModelConfigError,
    ModelMismatchError,
    MoepackError,
    TokenizerError,
    TruncatedError,
    UnsafeFileError,
)
from moepack.format import Pack
from moepack.format.reader import check_pack
from moepack.format.validate import read_pack_file
from moepack.runtime.streamer import Streamer

runner = CliRunner()
PROMPT = "Now is the winter"


@pytest.fixture(scope="module")
def base(baby, tmp_path_factory) -> Path:
    from moepack.compress import compress

    out = tmp_path_factory.mktemp("hostile") / "base.moepack"
    compress(str(baby("qwen2_moe", num_hidden_layers=2)), out, recipe="q4g64")
    return out


@pytest.fixture
def pack(base, tmp_path) -> Path:
    return Path(shutil.copytree(base, tmp_path / "p.moepack"))


def load(path: Path, vram=None):
    from moepack.runtime.api import MoePackModel

    return MoePackModel.load(path, device="cpu", backend="torch", context=32, vram=vram)


def smallest_budget(path: Path) -> int:
    """The smallest budget the pack loads with (to 1 KiB): the fewest slots, so experts are read again."""
    from fuzz_packs import small_budget

    return int(small_budget(path))


def flat(output: str) -> str:
    """CLI output with the 80-column wrapping undone."""
    return output.replace("\n", "")


def edit_manifest(pack: Path, fn) -> None:
    m = json.loads((pack / "manifest.json").read_text())
    fn(m)
    (pack / "manifest.json").write_text(json.dumps(m))


def flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        b = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([b[0] ^ 0x5A]))


def finishes(fn, seconds: float = 20.0):
    """Run `fn` in a thread; fail (instead of hanging the suite) if it does not return in time."""
    box: dict = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test thread
            box["error"] = exc

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"still running after {seconds} s (a hang)"
    if "error" in box:
        raise box["error"]
    return box.get("value")


# --- item 6: every pack file is a regular, bounded file inside the pack ----------------------------------
def test_the_pristine_pack_verifies_and_runs(pack):
    rep = check_pack(pack)
    assert rep["family"] == "qwen2_moe" and rep["tokenizer_tokens"] == 512
    with Pack(pack) as p:
        assert p.tokenizer().get_vocab_size() == 512
    assert len(load(pack).generate(PROMPT, max_new_tokens=2).tokens) == 2


def test_fifo_tokenizer_is_refused_without_hanging(pack):
    (pack / "tokenizer.json").unlink()
    os.mkfifo(pack / "tokenizer.json")
    with Pack(pack) as p:
        with pytest.raises(UnsafeFileError, match="tokenizer.json is a FIFO"):
            finishes(p.tokenizer)
    with pytest.raises(UnsafeFileError, match="FIFO"):
        finishes(lambda: check_pack(pack))


@pytest.mark.parametrize("name", ["tokenizer.json", "config.json", "manifest.json", "shard-00000.bin"])
def test_symlinked_pack_files_are_not_followed(pack, tmp_path, name):
    outside = tmp_path / ("outside-" + name)
    shutil.move(pack / name, outside)
    (pack / name).symlink_to(outside)
    with pytest.raises(UnsafeFileError, match="symbolic link"):
        check_pack(pack)
    res = runner.invoke(app, ["verify", str(pack)])
    assert res.exit_code == 2 and "symbolic link" in flat(res.output) and "Traceback" not in res.output


def test_a_symlink_inside_the_pack_is_refused_too(pack):
    os.rename(pack / "tokenizer.json", pack / "real-tokenizer.json")
    (pack / "tokenizer.json").symlink_to("real-tokenizer.json")
    with Pack(pack) as p, pytest.raises(UnsafeFileError, match="symbolic link"):
        p.tokenizer()


@pytest.mark.parametrize("name", ["manifest.json", "shard-00000.bin"])
def test_fifo_or_folder_in_place_of_a_file(pack, name):
    (pack / name).unlink()
    os.mkfifo(pack / name)
    with pytest.raises(UnsafeFileError, match="FIFO"):
        finishes(lambda: Pack(pack))
    (pack / name).unlink()
    (pack / name).mkdir()
    with pytest.raises(UnsafeFileError, match="directory"):
        Pack(pack)


def test_pack_files_are_size_bounded(pack):
    with pytest.raises(UnsafeFileError, match="over the 100-byte limit"):
        read_pack_file(pack, "tokenizer.json", max_bytes=100)


@pytest.mark.parametrize("damage", ["truncate", "utf8", "not_a_tokenizer", "nested"])
def test_damaged_tokenizer_is_a_typed_error_naming_the_file(pack, damage):
    tok = pack / "tokenizer.json"
    data = tok.read_bytes()
    tok.write_bytes({"truncate": data[: len(data) // 2], "utf8": b"\xff" + data, "not_a_tokenizer": b'{"model": 5}',
                     "nested": b"[" * 50000 + b"]" * 50000}[damage])
    with Pack(pack) as p, pytest.raises(TokenizerError, match="tokenizer.json"):
        p.tokenizer()
    res = runner.invoke(app, ["verify", str(pack)])
    assert res.exit_code == 2 and "tokenizer.json" in flat(res.output)


def test_tokenizer_with_ids_past_the_vocabulary(pack):
    tok = json.loads((pack / "tokenizer.json").read_text())
    tok["model"]["vocab"].update({f"zz{i}": 600 + i for i in range(10)})
    (pack / "tokenizer.json").write_text(json.dumps(tok))
    with Pack(pack) as p, pytest.raises(TokenizerError, match="vocabulary"):
        p.tokenizer()


# --- item 7: a shard truncated under a run -----------------------------------------------------------------
def test_truncated_shard_under_a_streaming_run_is_a_typed_error(pack):
    model = load(pack, vram=smallest_budget(pack))
    model.generate(PROMPT, max_new_tokens=1)
    shard = pack / "shard-00000.bin"
    os.truncate(shard, shard.stat().st_size // 3)
    with pytest.raises(TruncatedError, match="shard-00000.bin.*truncated while in use"):
        model.generate(PROMPT, max_new_tokens=8)


def test_truncated_shard_under_an_in_place_run_is_a_typed_error(pack):
    """No budget: experts are read once into private memory, so a truncation cannot SIGBUS a computation;
    the run goes on with the weights it verified, and an expert read after it is a TruncatedError."""
    model = load(pack)
    ref = model.generate(PROMPT, max_new_tokens=4).tokens
    other = load(pack).generate("To be, or not to be", max_new_tokens=4).tokens
    os.truncate(pack / "shard-00000.bin", 4096)
    assert model.generate(PROMPT, max_new_tokens=4).tokens == ref
    try:  # may route to experts not read yet
        assert model.generate("To be, or not to be", max_new_tokens=4).tokens == other
    except TruncatedError as exc:
        assert "shard-00000.bin" in str(exc)
    p = model.pack
    key = p.manifest.experts[-1].key
    p.release(*key)
    with pytest.raises(TruncatedError, match="shard-00000.bin.*truncated while in use"):
        p.expert_blob(*key, verify=True)


# --- item 8: shard bytes changed under a run ----------------------------------------------------------------
def _flip_every_expert(pack: Path) -> None:
    m = json.loads((pack / "manifest.json").read_text())
    for e in m["experts"]:
        flip(pack / m["shards"][e["shard"]]["name"], e["offset"] + e["nbytes"] // 2)


def test_changed_shard_under_a_streaming_run_stops_it(pack):
    model = load(pack, vram=smallest_budget(pack))
    model.generate(PROMPT, max_new_tokens=1)
    _flip_every_expert(pack)
    with pytest.raises(ChecksumError, match="shard-00000.bin.*checksum mismatch"):
        model.generate(PROMPT, max_new_tokens=8)


def test_changed_shard_under_an_in_place_run_never_reaches_the_weights(pack):
    model = load(pack)
    ref = model.generate(PROMPT, max_new_tokens=4).tokens
    other = load(pack).generate("To be, or not to be", max_new_tokens=4).tokens
    _flip_every_expert(pack)
    assert model.generate(PROMPT, max_new_tokens=4).tokens == ref  # the verified copies are in use
    try:  # may route to experts not read yet
        assert model.generate("To be, or not to be", max_new_tokens=4).tokens == other
    except ChecksumError as exc:
        assert "shard-00000.bin" in str(exc)
    key = model.pack.manifest.experts[-1].key
    model.pack.release(*key)
    with pytest.raises(ChecksumError, match="shard-00000.bin"):
        model.pack.expert_blob(*key, verify=True)


def test_streamer_checks_every_load(pack):
    with Pack(pack) as p:
        rec = p.manifest.experts[0]
        slot = torch.empty(rec.nbytes, dtype=torch.uint8)
        s = Streamer(p, torch.device("cpu"), rec.nbytes)
        s.load(rec.key, slot)
        assert torch.equal(slot, p.expert_blob(*rec.key, verify=True))
        flip(pack / "shard-00000.bin", rec.offset + 1)
        with pytest.raises(ChecksumError):
            s.load(rec.key, slot)


# --- item 9: verify checks what run relies on --------------------------------------------------------------
def _rename_dense(m, new):
    t = next(t for t in m["tensors"] if "q_proj.weight" in t["name"])
    t["name"] = new


@pytest.mark.parametrize("damage, error, words", [
    (lambda m: _rename_dense(m, "model.layers.0.self_attn.q_proj.renamed"), ModelMismatchError, "q_proj.weight"),
    (lambda m: _rename_dense(m, ""), ModelMismatchError, "does not list"),
    (lambda m: m["experts"].pop(3), ModelMismatchError, "missing"),
    (lambda m: m["model"]["config"].update(head_dim=1.5), ModelConfigError, "head_dim"),
    (lambda m: m["model"]["config"].update(num_hidden_layers="2"), ModelConfigError, "num_hidden_layers"),
    (lambda m: m["model"]["config"].update(hidden_size=64), ModelMismatchError, "shape"),
    (lambda m: m["model"]["config"].update(num_experts_per_tok=99), ModelConfigError, "top_k"),
])
def test_verify_and_run_refuse_what_run_cannot_use(pack, damage, error, words):
    edit_manifest(pack, damage)
    with pytest.raises(error, match=words):
        check_pack(pack)
    res = runner.invoke(app, ["verify", str(pack)])
    assert res.exit_code == 2 and "Traceback" not in res.output
    with pytest.raises(error, match=words):
        load(pack)


def test_verify_checks_the_calibration_statistics_auto_settings_read(pack):
    edit_manifest(pack, lambda m: m["meta"].update(adaptive={"keep_grid": "x"}))
    with pytest.raises(ManifestError, match="adaptive"):
        check_pack(pack)


def test_verify_refuses_a_missing_tokenizer(pack):
    (pack / "tokenizer.json").unlink()
    with pytest.raises(TruncatedError, match="tokenizer.json is missing"):
        check_pack(pack)


def test_config_values_are_checked_when_the_spec_is_built():
    good = {"model_type": "mixtral", "vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 1,
            "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 16, "num_local_experts": 4,
            "num_experts_per_tok": 2}
    assert spec_from_config(good).head_dim == 8
    assert spec_from_config({**good, "head_dim": 8.0}).head_dim == 8
    for bad in ({"head_dim": 1.5}, {"head_dim": -4}, {"num_attention_heads": 3}, {"rms_norm_eps": float("nan")},
                {"num_hidden_layers": 10**9}, {"vocab_size": True}, {"rope_scaling": [1]},
                {"eos_token_id": "x"}):
        with pytest.raises(ModelConfigError):
            spec_from_config({**good, **bad})


# --- manifests nested deep ----------------------------------------------------------------------------------
@pytest.mark.parametrize("depth", [100, 200000])
def test_deeply_nested_manifest_is_refused_before_parsing(pack, depth):
    m = json.loads((pack / "manifest.json").read_text())
    m["meta"] = "@"
    (pack / "manifest.json").write_text(json.dumps(m).replace('"@"', "[" * depth + "]" * depth))
    with pytest.raises(ManifestError, match="nested more than"):
        Pack(pack)
    for cmd in ("inspect", "verify", "run"):
        res = runner.invoke(app, [cmd, str(pack)] + (["--prompt", "x"] if cmd == "run" else []))
        assert res.exit_code == 2 and "nested more than" in flat(res.output), (cmd, res.output)


def test_brackets_inside_strings_do_not_count_as_nesting(pack):
    edit_manifest(pack, lambda m: m["meta"].update(note="[" * 1000 + '\\"{'))
    with Pack(pack) as p:
        assert p.manifest.meta["note"].startswith("[[[")


def test_errors_name_the_file(pack):
    (pack / "config.json").write_bytes(b"{\xff")
    with pytest.raises(MoepackError, match="config.json"):
        check_pack(pack)


# --- the scenario end to end: the CLI, a shard damaged while `run` streams --------------------------
@pytest.mark.parametrize("damage, words", [("truncate", "truncated while in use"), ("change", "checksum mismatch")])
def test_cli_run_stops_with_one_message_when_the_shard_is_damaged_under_it(pack, damage, words):
    import subprocess
    import sys

    vram = smallest_budget(pack) + 200 * 1024  # the KV cache of --context 200 over the 32 of smallest_budget
    proc = subprocess.Popen([sys.executable, "-m", "moepack", "run", str(pack), "--prompt", PROMPT, "-n", "150",
                             "--context", "200", "--backend", "torch", "--vram", str(vram)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.read(1)  # the run has started printing
    if damage == "truncate":
        os.truncate(pack / "shard-00000.bin", 4096)
    else:
        _flip_every_expert(pack)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, (proc.returncode, err[-500:])  # not 135 (SIGBUS), not 0 on damaged weights
    assert words in flat(err) and "shard-00000.bin" in flat(err) and "Traceback" not in err
