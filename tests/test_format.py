"""The .moepack container: round trips, determinism, atomicity, golden bytes, and one bad pack per error."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from packbuilder import build_tiny_pack, fp16_parts, q4_parts

from moepack.errors import (
    BadMagicError,
    ChecksumError,
    ManifestError,
    MoepackError,
    OutOfRangeError,
    OverlapError,
    TruncatedError,
    UnsafePathError,
    UnsupportedVersionError,
)
from moepack.format import Pack, PackWriter, projection_parts
from moepack.format.constants import EXPERT_ALIGNMENT, PART_ALIGNMENT, SHARD_HEADER_BYTES

FIXTURE = Path(__file__).parent / "fixtures" / "tiny-v2.moepack"
FIXTURE_V1 = Path(__file__).parent / "fixtures" / "tiny-v1.moepack"  # written by format version 1


def digest_dir(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


@pytest.fixture
def tiny(tmp_path) -> Path:
    return build_tiny_pack(tmp_path / "tiny.moepack")


def edit_manifest(pack: Path, fn) -> None:
    m = json.loads((pack / "manifest.json").read_text())
    fn(m)
    (pack / "manifest.json").write_text(json.dumps(m))


# --- round trips ---------------------------------------------------------------------------------
def test_round_trip_tensors_and_experts(tiny):
    with Pack(tiny, verify=True) as pack:
        emb = pack.tensor("model.embed_tokens.weight")
        g = torch.Generator().manual_seed(0)
        assert torch.equal(emb, torch.randn(16, 32, generator=g).to(torch.bfloat16))
        assert len(pack.manifest.experts) == 4
        for rec in pack.manifest.experts:
            assert rec.offset % EXPERT_ALIGNMENT == 0
            blob = pack.expert_blob(rec.layer, rec.expert)
            assert blob.numel() == rec.nbytes
            seed = rec.layer * 100 + rec.expert * 10
            for k, proj in enumerate(("up", "gate", "down")):
                want = (fp16_parts if rec.expert % 2 == 0 else q4_parts)(seed + k)
                got = projection_parts(blob, rec.projections[proj])
                assert list(got) == list(want)
                for name in want:
                    assert torch.equal(got[name], want[name]), (rec.key, proj, name)
                assert all(p.offset % PART_ALIGNMENT == 0 for p in rec.projections[proj].parts)


def test_writes_are_deterministic(tmp_path):
    a = build_tiny_pack(tmp_path / "a.moepack")
    b = build_tiny_pack(tmp_path / "b.moepack")
    assert digest_dir(a) == digest_dir(b)


def test_shards_roll_over_at_the_size_limit(tmp_path):
    pack = build_tiny_pack(tmp_path / "s.moepack", shard_bytes=SHARD_HEADER_BYTES + 2 * EXPERT_ALIGNMENT)
    with Pack(pack, verify=True) as p:
        assert len(p.manifest.shards) > 2
        assert len({e.shard for e in p.manifest.experts}) > 1


def test_golden_bytes_match_pinned_v2_fixture(tmp_path):
    """The writer's bytes for the tiny pack are pinned; the fixture must keep loading."""
    fresh = build_tiny_pack(tmp_path / "tiny-v2.moepack")
    assert digest_dir(fresh) == digest_dir(FIXTURE), "writer output changed: a format change needs a version bump"
    with Pack(FIXTURE, verify=True) as p:
        assert p.manifest.format_version == 2


def test_version_1_pack_still_reads(tmp_path):
    """A pack written by format version 1 (pinned bytes) loads, verifies and decodes to the same parts as the
    current writer's; the two differ only in the version fields."""
    with Pack(FIXTURE_V1, verify=True) as old, Pack(FIXTURE, verify=True) as new:
        assert old.manifest.format_version == 1
        assert [e.key for e in old.manifest.experts] == [e.key for e in new.manifest.experts]
        for rec in old.manifest.experts:
            a = old.expert_blob(rec.layer, rec.expert)
            b = new.expert_blob(rec.layer, rec.expert)
            assert torch.equal(a, b)
            for proj in ("up", "gate", "down"):
                got = projection_parts(a, rec.projections[proj])
                seed = rec.layer * 100 + rec.expert * 10 + ("up", "gate", "down").index(proj)
                want = (fp16_parts if rec.expert % 2 == 0 else q4_parts)(seed)
                assert all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("recipe,cols", [("2:4+fp16", 30), ("q4g32d", 32)], ids=["short-nm-block", "dq-metadata"])
def test_version_1_pack_cannot_claim_a_version_2_layout(tmp_path, recipe, cols):
    """A short N:M block (30 columns under 2:4) and double-quantised metadata are version-2 features: a
    version-1 manifest that needs one is refused by name; the same record is valid in a version-2 pack."""
    pack = tmp_path / "old.moepack"
    shutil.copytree(FIXTURE_V1, pack)

    def ragged(m):  # re-describe a projection with `recipe` on `cols` columns
        from moepack.codecs import part_specs
        from moepack.format.constants import DTYPE_NAMES

        rec = m["experts"][0]["projections"]["up"]
        specs = part_specs(recipe, (8, cols))
        rec["recipe"], rec["shape"] = recipe, [8, cols]
        off = rec["parts"][0]["offset"]
        rec["parts"] = []
        for s in specs:
            rec["parts"].append({"name": s.name, "dtype": DTYPE_NAMES[s.dtype], "shape": list(s.shape),
                                 "offset": off, "nbytes": s.nbytes})
            off += -(-s.nbytes // PART_ALIGNMENT) * PART_ALIGNMENT

    edit_manifest(pack, ragged)
    with pytest.raises(ManifestError, match="format version 1 cannot hold"):
        Pack(pack)
    edit_manifest(pack, lambda m: m.update(format_version=2))
    Pack(pack).close()  # the same record is valid in a version-2 pack


# --- atomicity -----------------------------------------------------------------------------------
def test_interrupted_write_leaves_nothing_that_validates(tmp_path):
    out = tmp_path / "x.moepack"
    with pytest.raises(RuntimeError):
        with PackWriter(out, model={}, source={}) as w:
            w.add_tensor("a", torch.ones(4))
            raise RuntimeError("killed")
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_unfinished_partial_directory_is_not_a_pack(tmp_path):
    out = tmp_path / "x.moepack"
    w = PackWriter(out, model={}, source={})
    w.add_tensor("a", torch.ones(4))  # a crash here: no finish, no rename
    assert not out.exists()
    with pytest.raises(ManifestError, match="manifest.json is missing"):
        Pack(w.tmp)
    w.abort()


def test_existing_pack_is_not_replaced_without_overwrite(tiny):
    before = digest_dir(tiny)
    with pytest.raises(MoepackError, match="already exists"):
        PackWriter(tiny, model={}, source={})
    assert digest_dir(tiny) == before


# --- one malformed pack per error ----------------------------------------------------------------
def test_bad_manifest_magic(tiny):
    edit_manifest(tiny, lambda m: m.update(magic="gguf"))
    with pytest.raises(BadMagicError, match="manifest.json"):
        Pack(tiny)


def test_unsupported_manifest_version(tiny):
    edit_manifest(tiny, lambda m: m.update(format_version=99))
    with pytest.raises(UnsupportedVersionError, match="format version 99"):
        Pack(tiny)


def test_bad_shard_magic(tiny):
    shard = tiny / "shard-00000.bin"
    with open(shard, "r+b") as fh:
        fh.write(b"NOTAPACK")
    with pytest.raises(BadMagicError, match="shard-00000.bin"):
        Pack(tiny)


def test_unsupported_shard_version(tiny):
    with open(tiny / "shard-00000.bin", "r+b") as fh:
        fh.seek(8)
        fh.write(struct.pack("<I", 7))
    with pytest.raises(UnsupportedVersionError, match="shard-00000.bin"):
        Pack(tiny)


def test_truncated_shard(tiny):
    shard = tiny / "shard-00000.bin"
    os.truncate(shard, shard.stat().st_size - 100)
    with pytest.raises(TruncatedError, match="truncated"):
        Pack(tiny)


def test_trailing_bytes_in_shard(tiny):
    with open(tiny / "shard-00000.bin", "ab") as fh:
        fh.write(b"\x00" * 10)
    with pytest.raises(OutOfRangeError, match="trailing"):
        Pack(tiny)


def test_offset_out_of_range(tiny):
    edit_manifest(tiny, lambda m: m["experts"][0].update(offset=m["shards"][0]["nbytes"]))
    with pytest.raises(OutOfRangeError, match="outside shard"):
        Pack(tiny)


def test_hostile_huge_offset(tiny):
    edit_manifest(tiny, lambda m: m["tensors"][0].update(offset=1 << 62))
    with pytest.raises(OutOfRangeError, match="outside"):
        Pack(tiny)


def test_misaligned_expert(tiny):
    edit_manifest(tiny, lambda m: m["experts"][0].update(offset=m["experts"][0]["offset"] + 64))
    with pytest.raises(OutOfRangeError, match="aligned"):
        Pack(tiny)


def test_overlapping_records(tiny):
    def overlap(m):
        a, b = m["experts"][0], m["experts"][1]
        b.update(shard=a["shard"], offset=a["offset"])
    edit_manifest(tiny, overlap)
    with pytest.raises(OverlapError, match="overlap"):
        Pack(tiny)


def test_tensor_size_inconsistent_with_shape(tiny):
    edit_manifest(tiny, lambda m: m["tensors"][0].update(shape=[1000, 1000]))
    with pytest.raises(OutOfRangeError, match="does not match"):
        Pack(tiny)


def test_parts_that_do_not_match_the_recipe(tiny):
    edit_manifest(tiny, lambda m: m["experts"][1]["projections"]["up"].update(recipe="q2g32"))
    with pytest.raises(ManifestError, match="do not match recipe"):
        Pack(tiny)


def test_duplicate_expert(tiny):
    edit_manifest(tiny, lambda m: m["experts"].append(dict(m["experts"][0])))
    with pytest.raises(ManifestError, match="twice"):
        Pack(tiny)


def test_checksum_mismatch(tiny):
    with Pack(tiny) as p:
        rec = p.manifest.experts[0]
        shard = tiny / p.manifest.shards[rec.shard].name
    with open(shard, "r+b") as fh:
        fh.seek(rec.offset + 5)
        byte = fh.read(1)
        fh.seek(rec.offset + 5)
        fh.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(ChecksumError, match="expert 0.0"):
        Pack(tiny, verify=True)
    with Pack(tiny) as p:  # opening without verify works; loading that expert with verify does not
        with pytest.raises(ChecksumError):
            p.expert_blob(0, 0, verify=True)


@pytest.mark.parametrize("name", ["../evil.bin", "/etc/passwd", "..", "a/b.bin", ".hidden"])
def test_shard_names_cannot_leave_the_pack(tiny, name):
    edit_manifest(tiny, lambda m: m["shards"][0].update(name=name))
    with pytest.raises(UnsafePathError):
        Pack(tiny)


def test_symlinked_shard_outside_the_pack(tiny, tmp_path):
    outside = tmp_path / "outside.bin"
    shutil.move(tiny / "shard-00000.bin", outside)
    (tiny / "shard-00000.bin").symlink_to(outside)
    with pytest.raises(UnsafePathError, match="outside"):
        Pack(tiny)


def test_missing_manifest_field(tiny):
    edit_manifest(tiny, lambda m: m.pop("experts"))
    with pytest.raises(ManifestError, match="experts"):
        Pack(tiny)


@pytest.mark.parametrize("text", ["{not json", '{"magic": NaN}', "[]", ""])
def test_invalid_manifest_json(tiny, text):
    (tiny / "manifest.json").write_text(text)
    with pytest.raises((ManifestError, BadMagicError)):
        Pack(tiny)


# --- fuzz ------------------------------------------------------------------------------------------
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_manifest_is_accepted_or_rejected_with_a_typed_error(tiny, data):
    raw = bytearray(FIXTURE.joinpath("manifest.json").read_bytes())
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    (tiny / "manifest.json").write_bytes(bytes(raw))
    try:
        Pack(tiny, verify=True).close()
    except MoepackError:
        pass


# --- hostile files (issue 15) ----------------------------------------------------------------------------
def test_a_symlinked_shard_inside_the_pack_is_refused(tiny):
    os.rename(tiny / "shard-00000.bin", tiny / "real.bin")
    (tiny / "shard-00000.bin").symlink_to("real.bin")
    with pytest.raises(UnsafePathError, match="symbolic link"):
        Pack(tiny)


def test_a_symlinked_manifest_is_refused(tiny, tmp_path):
    shutil.move(tiny / "manifest.json", tmp_path / "manifest.json")
    (tiny / "manifest.json").symlink_to(tmp_path / "manifest.json")
    with pytest.raises(UnsafePathError, match="manifest.json is a symbolic link"):
        Pack(tiny)


@pytest.mark.parametrize("text, deep", [
    (b'{"a": [[[1]]]}', False), (b'{"a": "[[[[[[[[[[[[[["}', False), (b'{"a": "\\\\", "b": [[[[[[[]]]]]]]}', True),
    (b'{"a": "\\"[[[[[[[[[[\\""}', False), (b'[' * 7 + b']' * 7, True),
])
def test_json_depth_is_counted_outside_strings(tmp_path, text, deep):
    from moepack.format.validate import check_json_depth

    if deep:
        with pytest.raises(ManifestError, match="nested more than 6"):
            check_json_depth(text, tmp_path, limit=6)
    else:
        check_json_depth(text, tmp_path, limit=6)


def test_a_shard_truncated_after_open_is_a_typed_error_not_a_signal(tiny):
    with Pack(tiny) as p:
        rec = p.manifest.experts[-1]
        os.truncate(tiny / p.manifest.shards[rec.shard].name, rec.offset + 10)
        with pytest.raises(TruncatedError, match="truncated while in use"):
            p.expert_blob(*rec.key)
        with pytest.raises(TruncatedError):
            p.read_expert_into(*rec.key, torch.empty(rec.nbytes, dtype=torch.uint8))


def test_blobs_are_private_copies_checked_on_every_slot_load(tiny):
    with Pack(tiny) as p:
        rec = p.manifest.experts[0]
        blob = p.expert_blob(*rec.key, verify=True).clone()
        slot = torch.empty(rec.nbytes + 64, dtype=torch.uint8)
        assert torch.equal(p.read_expert_into(*rec.key, slot), blob)
        with open(tiny / p.manifest.shards[rec.shard].name, "r+b") as fh:
            fh.seek(rec.offset)
            fh.write(bytes([fh.read(1)[0] ^ 1]))
        assert torch.equal(p.expert_blob(*rec.key, verify=True), blob)  # the copy read before the change
        with pytest.raises(ChecksumError, match="changed while in use"):
            p.read_expert_into(*rec.key, slot)
        p.release(*rec.key)
        with pytest.raises(ChecksumError):
            p.expert_blob(*rec.key, verify=True)


@pytest.mark.parametrize("value", [10**400, "0.5", True])
def test_record_numbers_must_be_finite(tiny, value):
    edit_manifest(tiny, lambda m: m["experts"][0].update(frequency=value))
    with pytest.raises(ManifestError, match="frequency"):
        Pack(tiny)
