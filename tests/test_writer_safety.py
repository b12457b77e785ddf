"""Writers that cannot destroy (issue 15): --force replaces only packs, one writer per output path, a kill at
any moment leaves the old pack or the new one (and the next compress / verify / run repairs the rest), a full
disk or a forbidden folder is a typed error with nothing left behind, bad option values are refused before
anything is loaded, and calibrated packs are byte-identical across runs."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from moepack.cli.app import app
from moepack.compress import compress
from moepack.errors import ConfigError, OutputExistsError, OutputInUseError, PackWriteError
from moepack.format import Pack
from moepack.format.publish import leftovers, recover_replace
from moepack.format.writer import PackWriter
from moepack.source import resolve_pack

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_thread")


def digest_dir(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def recipes_of(pack: Path) -> set[str]:
    with Pack(pack, verify=True) as p:
        return {pr.recipe for rec in p.manifest.experts for pr in rec.projections.values()}


def hidden_siblings(out: Path) -> list[str]:
    return sorted(n for n in os.listdir(out.parent) if n.startswith(f".{out.name}."))


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def compress_script(src: Path, out: Path, recipe: str, *, force: bool, prelude: str = "") -> list[str]:
    """A python command that compresses in a fresh process, printing `ready` once imports are done."""
    code = textwrap.dedent(f"""
        import os, signal, sys, time
        {prelude}
        from moepack.compress import compress
        print("ready", flush=True)
        t0 = time.perf_counter()
        compress({str(src)!r}, {str(out)!r}, recipe={recipe!r}, force={force})
        print("done", time.perf_counter() - t0, flush=True)
    """)
    return [sys.executable, "-c", code]


# --- 1. --force replaces only a pack ------------------------------------------------------------------
def test_force_refuses_a_folder_that_is_not_a_pack(baby, tmp_path):
    out = tmp_path / "notes"
    (out / "sub").mkdir(parents=True)
    (out / "sub" / "data.txt").write_text("the user's work")
    before = digest_dir(out)
    for force in (False, True):
        with pytest.raises(OutputExistsError, match="not a moepack pack") as info:
            compress(str(baby("mixtral")), out, recipe="q4g32", force=force)
        assert str(out) in str(info.value)
    assert digest_dir(out) == before
    assert sorted(os.listdir(tmp_path)) == ["notes"]  # no lock file, no partial


def test_force_refuses_a_regular_file_and_a_symlink(baby, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me")
    with pytest.raises(OutputExistsError, match="not a folder"):
        compress(str(baby("mixtral")), notes, recipe="q4g32", force=True)
    assert notes.read_text() == "keep me"
    pack = compress(str(baby("mixtral")), tmp_path / "real.moepack", recipe="q4g32").path
    link = tmp_path / "link.moepack"
    link.symlink_to(pack, target_is_directory=True)
    with pytest.raises(OutputExistsError, match="symbolic link"):
        compress(str(baby("mixtral")), link, recipe="q2g32", force=True)
    assert link.is_symlink() and recipes_of(pack) == {"q4g32"}


def test_force_refuses_a_pack_folder_holding_other_files(baby, tmp_path):
    out = compress(str(baby("mixtral")), tmp_path / "p.moepack", recipe="q4g32").path
    (out / "my-notes.txt").write_text("not part of the pack")
    before = digest_dir(out)
    with pytest.raises(OutputExistsError, match="my-notes.txt"):
        compress(str(baby("mixtral")), out, recipe="q2g32", force=True)
    assert digest_dir(out) == before


def test_force_refuses_a_folder_whose_manifest_has_another_magic(baby, tmp_path):
    out = tmp_path / "x.moepack"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"magic": "gguf"}))
    with pytest.raises(OutputExistsError, match="moepack magic"):
        compress(str(baby("mixtral")), out, recipe="q4g32", force=True)
    assert json.loads((out / "manifest.json").read_text()) == {"magic": "gguf"}


# --- 2. one writer per output path --------------------------------------------------------------------
def test_a_held_lock_refuses_a_second_writer_at_once(baby, tmp_path):
    out = tmp_path / "p.moepack"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import fcntl, os, sys, time
        fd = os.open({str(tmp_path / '.p.moepack.lock')!r}, os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX)
        print("locked", flush=True)
        time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        t0 = time.perf_counter()
        with pytest.raises(OutputInUseError, match="another moepack compress is writing"):
            compress(str(baby("mixtral")), out, recipe="q4g32")
        assert time.perf_counter() - t0 < 5  # refused before loading or encoding anything
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()
    compress(str(baby("mixtral")), out, recipe="q4g32")  # the kernel dropped the dead holder's lock
    assert recipes_of(out) == {"q4g32"}
    assert hidden_siblings(out) == []  # the lock file goes with the lock


def test_racing_compresses_give_one_pack_and_one_clean_refusal(baby, tmp_path):
    src, out = baby("mixtral"), tmp_path / "p.moepack"
    cmds = [[sys.executable, "-m", "moepack.cli.app", "compress", str(src), "-o", str(out), "--recipe", r]
            for r in ("bf16", "q4g32")]
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in cmds]
    results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    winners = [i for i, (rc, _, _) in enumerate(results) if rc == 0]
    assert len(winners) == 1, results
    loser = results[1 - winners[0]]
    assert loser[0] == 2 and "Traceback" not in loser[2]
    said = " ".join(loser[2].split())  # rich wraps at the terminal width
    assert "another moepack compress is writing" in said or "already exists" in said
    assert "wrote" in results[winners[0]][1] and "wrote" not in loser[1]
    assert recipes_of(out) == {("bf16", "q4g32")[winners[0]]}
    assert hidden_siblings(out) == []


# --- 3. kills at any moment ---------------------------------------------------------------------------
def test_kill_between_the_two_renames_is_completed_by_the_next_reader(baby, tmp_path, capsys):
    src, out = baby("mixtral"), tmp_path / "p.moepack"
    compress(str(src), out, recipe="q4g32")
    prelude = """
        real = os.replace
        def replace(a, b):
            real(a, b)
            if ".old-" in str(b):
                os.kill(os.getpid(), signal.SIGKILL)
        os.replace = replace
    """
    proc = subprocess.run(compress_script(src, out, "q2g32", force=True, prelude=textwrap.indent(
        textwrap.dedent(prelude), " " * 8)), capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not os.path.lexists(out)  # the old pack set aside, the new one complete beside it
    assert {f.kind for f in leftovers(out)} == {"old", "partial"}
    assert resolve_pack(str(out)) == out  # what run, verify, inspect and eval call first
    assert "completed a replace interrupted" in " ".join(capsys.readouterr().err.split())  # wrapped at 80
    assert recipes_of(out) == {"q2g32"} and hidden_siblings(out) == []


def test_an_incomplete_new_pack_is_rolled_back_to_the_old_one(baby, tmp_path):
    src, out = baby("mixtral"), tmp_path / "p.moepack"
    compress(str(src), out, recipe="q4g32")
    before, pid = digest_dir(out), dead_pid()
    partial = compress(str(src), tmp_path / "new.moepack", recipe="q2g32").path
    (partial / "manifest.json").unlink()  # killed before the manifest was written
    partial.rename(tmp_path / f".p.moepack.partial-{pid}")
    out.rename(tmp_path / f".p.moepack.old-{pid}")
    msg = recover_replace(out)
    assert msg is not None and "restored the previous pack" in msg and "removed 1 unfinished write" in msg
    assert digest_dir(out) == before and hidden_siblings(out) == []
    assert recover_replace(out) is None  # nothing left to do, and no file created for it
    assert hidden_siblings(out) == []


def test_the_next_compress_completes_an_interrupted_replace_and_says_so(baby, tmp_path):
    src, out = baby("mixtral"), tmp_path / "p.moepack"
    old = compress(str(src), out, recipe="q4g32").path
    new = compress(str(src), tmp_path / "new.moepack", recipe="q2g32").path
    pid = dead_pid()
    old.rename(tmp_path / f".p.moepack.old-{pid}")  # the state a kill between the renames leaves
    new.rename(tmp_path / f".p.moepack.partial-{pid}")
    notes: list[str] = []
    with pytest.raises(OutputExistsError, match="already exists"):  # repaired first, then refused: no --force
        compress(str(src), out, recipe="q4g64", notice=notes.append)
    assert len(notes) == 1 and "completed a replace" in notes[0] and str(out) in notes[0]
    assert recipes_of(out) == {"q2g32"} and hidden_siblings(out) == []


def test_kill_9_at_random_moments_never_leaves_a_broken_pack(baby, tmp_path):
    src, out = baby("mixtral"), tmp_path / "p.moepack"
    first = subprocess.run(compress_script(src, out, "q4g32", force=False), capture_output=True, text=True,
                           timeout=300)
    assert first.returncode == 0, first.stderr
    seconds = float(first.stdout.split()[-1])  # compress alone, imports excluded
    rng, possible = random.Random(15), [{"q4g32"}]
    for i, recipe in enumerate(("q2g32", "q4g64", "q2g64")):
        possible.append({recipe})
        proc = subprocess.Popen(compress_script(src, out, recipe, force=True), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0, 1.2 * seconds))
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        if os.path.lexists(out):  # whatever is under the final name is a whole pack, old or new
            assert recipes_of(out) in possible
        if i < 2:
            recover_replace(out)
        else:  # the next compress repairs and cleans up too
            compress(str(src), out, recipe="q4g32", force=True)
        assert recipes_of(out) and hidden_siblings(out) == []


# --- 4. disk full, forbidden folders, stale partials --------------------------------------------------
class FullDisk:
    """A file object that accepts `room` bytes, then fails every write and the final flush with ENOSPC."""

    def __init__(self, fh, room: list[int]):
        self.fh, self.room, self.failed = fh, room, False

    def write(self, data) -> int:
        n = len(memoryview(data).cast("B"))
        if n > self.room[0]:
            self.failed = True
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room[0] -= n
        return self.fh.write(data)

    def close(self) -> None:
        self.fh.close()
        if self.failed:  # the buffered rest cannot be flushed either: cleanup meets ENOSPC too
            raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name):
        return getattr(self.fh, name)


def test_disk_full_is_a_typed_error_and_leaves_nothing(baby, tmp_path, monkeypatch):
    import moepack.format.writer as writer

    room = [200_000]
    monkeypatch.setattr(writer, "open", lambda *a, **k: FullDisk(open(*a, **k), room), raising=False)
    with pytest.raises(PackWriteError, match="no space left on the device") as info:
        compress(str(baby("mixtral")), tmp_path / "p.moepack", recipe="bf16")
    assert "p.moepack" in str(info.value)
    assert os.listdir(tmp_path) == []  # no pack, no partial, no lock file


def test_disk_full_in_the_cli_is_one_message_exit_2(baby, tmp_path, monkeypatch):
    import moepack.format.writer as writer

    room = [100_000]
    monkeypatch.setattr(writer, "open", lambda *a, **k: FullDisk(open(*a, **k), room), raising=False)
    result = runner.invoke(app, ["compress", str(baby("mixtral")), "-o", str(tmp_path / "p.moepack"),
                                 "--recipe", "bf16"])
    assert result.exit_code == 2 and "no space left" in result.output and "Traceback" not in result.output
    assert os.listdir(tmp_path) == []


def test_a_folder_that_cannot_be_written_is_a_typed_error(baby, tmp_path, monkeypatch):
    real = Path.mkdir

    def forbidden(self, *args, **kwargs):
        if ".partial-" in self.name:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", forbidden)
    with pytest.raises(PackWriteError, match="permission denied"):
        compress(str(baby("mixtral")), tmp_path / "p.moepack", recipe="q4g32")
    assert os.listdir(tmp_path) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_is_a_typed_error(baby, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(PackWriteError, match="permission denied"):
            compress(str(baby("mixtral")), ro / "p.moepack", recipe="q4g32")
    finally:
        ro.chmod(0o755)


def test_the_next_compress_removes_stale_partials(baby, tmp_path):
    gone = dead_pid()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        for name in (f".p.moepack.partial-{gone}", f".other.moepack.partial-{gone}",
                     f".busy.moepack.partial-{sleeper.pid}"):
            (tmp_path / name).mkdir()
            (tmp_path / name / "shard-00000.bin").write_bytes(b"\0" * 4096)
        notes: list[str] = []
        report = compress(str(baby("mixtral")), tmp_path / "p.moepack", recipe="q4g32", notice=notes.append)
        assert notes == report.notices and len(notes) == 2 and all("unfinished write" in n for n in notes)
        # a partial whose process still runs may be a live write: kept
        assert sorted(os.listdir(tmp_path)) == [f".busy.moepack.partial-{sleeper.pid}", "p.moepack"]
    finally:
        sleeper.kill()
        sleeper.wait()


def test_cleanup_that_fails_halfway_still_removes_everything(tmp_path, monkeypatch):
    from moepack.format.publish import remove_tree

    folder = tmp_path / ".p.moepack.partial-1"
    (folder / "sub").mkdir(parents=True)
    for name in ("a.bin", "b.bin", "sub/c.bin"):
        (folder / name).write_bytes(b"x" * 100)
    real, failed = os.unlink, []

    def flaky(path, *args, **kwargs):
        if str(path).endswith("b.bin") and not failed:
            failed.append(path)
            raise OSError(errno.EBUSY, "Device or resource busy")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", flaky)
    assert remove_tree(folder) and failed and not folder.exists()


def test_a_partial_that_cannot_be_removed_is_named_in_the_error(tmp_path, monkeypatch):
    import torch

    import moepack.format.writer as writer

    def full(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer, "remove_tree", lambda path: not path.exists() or ".partial-" not in path.name)
    monkeypatch.setattr(writer.PackWriter, "_write", full)
    with pytest.raises(PackWriteError, match=r"no space left.*could not remove .*\.x\.moepack\.partial-"):
        with PackWriter(tmp_path / "x.moepack", model={}, source={}) as w:
            w.add_tensor("a", torch.ones(4))


def test_files_that_only_look_like_leftovers_are_never_touched(baby, tmp_path):
    gone = dead_pid()
    user = [tmp_path / f".notes.old-{gone}", tmp_path / f".p.moepack.old-{gone}",
            tmp_path / f".p.moepack.partial-{gone}", tmp_path / f".cfg.moepack.partial-{gone}"]
    user[0].mkdir()
    (user[0] / "diary.txt").write_text("mine")
    (user[1] / "sub").mkdir(parents=True)  # not a pack: never restored in place of p.moepack
    (user[1] / "manifest.json").write_text('{"magic": "other"}')
    (user[2] / "keep").mkdir(parents=True)  # holds a folder: no writer made it
    user[3].write_text("a file, not a folder")
    before = {str(p): digest_dir(p) if p.is_dir() else p.read_text() for p in user}
    compress(str(baby("mixtral")), tmp_path / "p.moepack", recipe="q4g32")
    assert {str(p): digest_dir(p) if p.is_dir() else p.read_text() for p in user} == before
    assert (user[2] / "keep").is_dir()


def test_an_old_pack_half_removed_when_the_kill_came_is_removed(baby, tmp_path):
    out = compress(str(baby("mixtral")), tmp_path / "p.moepack", recipe="q4g32").path
    half = tmp_path / f".p.moepack.old-{dead_pid()}"
    half.mkdir()
    (half / "shard-00000.bin").write_bytes(b"\0" * 8192)  # its manifest already gone
    msg = recover_replace(out)
    assert msg is not None and "previous pack" in msg and hidden_siblings(out) == []
    assert recipes_of(out) == {"q4g32"}
    assert recover_replace(tmp_path / "p.moepack") is None


def test_writer_context_releases_the_lock_on_every_exit(tmp_path):
    import torch

    out = tmp_path / "x.moepack"
    with pytest.raises(RuntimeError):
        with PackWriter(out, model={}, source={}) as w:
            w.add_tensor("a", torch.ones(4))
            raise RuntimeError("boom")
    with PackWriter(out, model={}, source={}) as w:  # the lock is free again
        w.add_tensor("a", torch.ones(4))
        w.finish()
    assert sorted(os.listdir(tmp_path)) == ["x.moepack"]


# --- 6. bad values refused before loading -------------------------------------------------------------
@pytest.mark.parametrize("kwargs, option", [
    ({"target_ratio": 0}, "--target-ratio"), ({"target_ratio": -3}, "--target-ratio"),
    ({"target_ratio": 1}, "--target-ratio"), ({"target_ratio": float("nan")}, "--target-ratio"),
    ({"target_ratio": float("inf")}, "--target-ratio"), ({"shard_bytes": 0}, "--shard-size"),
    ({"shard_bytes": -1}, "--shard-size"), ({"recipe": "q4g32", "target_ratio": 4}, "not both"),
])
def test_bad_values_are_refused_before_loading(tmp_path, monkeypatch, kwargs, option):
    import moepack.compress as mod

    def never(*args, **kwargs):
        raise AssertionError("loaded or profiled before checking the options")

    monkeypatch.setattr(mod, "resolve_source", never)
    monkeypatch.setattr(mod, "_profile", never)
    with pytest.raises(ConfigError, match=option):
        compress("any-model", tmp_path / "p.moepack", **kwargs)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("args, option", [
    (["--shard-size", "0"], "--shard-size"), (["--shard-size=-5"], "--shard-size"),
    (["--shard-size", "lots"], "--shard-size"), (["--target-ratio", "0"], "--target-ratio"),
    (["--target-ratio=-3"], "--target-ratio"),
])
def test_bad_values_in_the_cli_are_one_message(tmp_path, monkeypatch, args, option):
    import moepack.compress as mod

    monkeypatch.setattr(mod, "resolve_source", lambda *a: (_ for _ in ()).throw(AssertionError("loaded")))
    result = runner.invoke(app, ["compress", "any-model", "-o", str(tmp_path / "p.moepack"), *args])
    assert result.exit_code == 2 and option in result.output and "Traceback" not in result.output


# --- 7. deterministic calibrated packs ----------------------------------------------------------------
def test_calibrated_packs_are_byte_identical_across_runs(baby, tmp_path):
    from moepack.profile import profile

    src = str(baby("mixtral"))
    digests = []
    for i in range(2):  # two separate profiles: different timings, the same bytes
        prof = profile(src, candidates=("q4g32",), max_tokens=256, tune=False)
        report = compress(src, tmp_path / f"c{i}.moepack", recipe="q4g32", profile=prof)
        digests.append(digest_dir(report.path))
        assert report.profile_seconds and report.profile_seconds > 0  # the time is reported, not stored
    assert digests[0] == digests[1]
