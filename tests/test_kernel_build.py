"""The C++ kernel build never hangs and never rebuilds another checkout's kernels (issue 15 item 5).

No test here compiles: the lock, the folder key and the timeout are checked on their own, and
`moepack doctor --json` runs in a fresh process (it builds, or reuses the cached build).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
import warnings

import pytest
import torch

from moepack.errors import KernelUnavailableError
from moepack.kernels import Backend, matmul, ops
from moepack.kernels._build import LOCK_NAME, CppExtension, build_key, build_lock


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _hold_lock(folder, seconds: float) -> subprocess.Popen:
    """A live process holding the build lock of `folder` for `seconds` (waits until it holds it)."""
    code = textwrap.dedent(
        f"""
        import fcntl, os, sys, time
        fd = os.open({str(folder / LOCK_NAME)!r}, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        print("held", flush=True)
        time.sleep({seconds})
        """
    )
    folder.mkdir(parents=True, exist_ok=True)
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_stale_lock_of_a_dead_process_is_recovered(tmp_path):
    """A build killed mid-way leaves our lock file (with its PID) and torch's `lock` baton, which torch
    would wait on forever: the next builder takes the lock at once, names what it recovered, and removes
    the baton."""
    dead = _dead_pid()
    (tmp_path / LOCK_NAME).write_text(f"{dead}\n")
    (tmp_path / "lock").write_text("")
    t0 = time.monotonic()
    with build_lock(tmp_path, timeout=5.0) as note:
        assert time.monotonic() - t0 < 2.0
        assert not (tmp_path / "lock").exists()
        assert f"process {dead}" in note and "stale torch build lock" in note
        assert (tmp_path / LOCK_NAME).read_text().strip() == str(os.getpid())
    assert (tmp_path / LOCK_NAME).read_text() == ""  # released cleanly: no PID left behind
    with build_lock(tmp_path, timeout=0.5) as note:
        assert note is None


def test_held_lock_times_out(tmp_path, capsys):
    """A live builder holding the lock: the waiter says whom it waits for, once, and gives up in time."""
    holder = _hold_lock(tmp_path, 30)
    try:
        t0 = time.monotonic()
        with pytest.raises(KernelUnavailableError, match=f"process {holder.pid}.*0.3 s"):
            with build_lock(tmp_path, timeout=0.3):
                pass
        assert time.monotonic() - t0 < 5.0
        err = capsys.readouterr().err
        assert err.count("waiting for") == 1 and f"process {holder.pid}" in err
    finally:
        holder.kill()
        holder.wait()
    with build_lock(tmp_path, timeout=5.0) as note:  # the kernel released the killed holder's lock
        assert note is not None and f"process {holder.pid}" in note


def test_held_lock_falls_back_to_torch_with_one_warning(tmp_path, monkeypatch):
    """Another process building (the lock held) past MOEPACK_BUILD_TIMEOUT: AUTO continues on TORCH with
    a single RuntimeWarning naming the lock, and an explicit CPP says why."""
    ext = CppExtension(root=tmp_path)
    monkeypatch.setenv("MOEPACK_BUILD_TIMEOUT", "0.2")
    monkeypatch.setitem(ops._EXTENSIONS, Backend.CPP, ext)
    monkeypatch.setitem(ops._REGISTRY, Backend.CPP, ops._compiled_impl(Backend.CPP, ext, "cpu"))
    _, folder = ext.build_dir()
    holder = _hold_lock(folder, 30)
    try:
        parts = {"codes": torch.randint(0, 256, (8, 64), dtype=torch.uint8),
                 "scale": torch.full((8, 2), 0.01).half(), "zero": torch.full((8, 2), 7.0).half()}
        x = torch.randn(2, 128)
        with pytest.warns(RuntimeWarning, match="build lock") as record:
            y = matmul(x, parts, "q4g64", (8, 128))
        assert len(record) == 1
        assert torch.equal(y, matmul(x, parts, "q4g64", (8, 128), backend="torch"))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            matmul(x, parts, "q4g64", (8, 128))
        with pytest.raises(KernelUnavailableError, match="MOEPACK_BUILD_TIMEOUT"):
            matmul(x, parts, "q4g64", (8, 128), backend="cpp")
    finally:
        holder.kill()
        holder.wait()


def test_build_folder_is_keyed_by_sources_and_flags(tmp_path):
    a, b = tmp_path / "a.cpp", tmp_path / "b.h"
    a.write_text("int f() { return 1; }\n")
    b.write_text("// header\n")
    base = build_key([a, b], ["-O3"], [])
    assert build_key([a, b], ["-O3"], []) == base  # deterministic
    assert build_key([a, b], ["-O2"], []) != base
    assert build_key([a, b], ["-O3"], ["-fopenmp"]) != base
    b.write_text("// header, changed\n")
    assert build_key([a, b], ["-O3"], []) != base
    name, folder = CppExtension(root=tmp_path).build_dir()
    assert folder.parent == tmp_path and name.split("_")[-1] == folder.name.split("-")[-1]


def test_bad_timeout_value_is_a_clear_error(monkeypatch):
    from moepack.kernels._build import build_timeout

    monkeypatch.setenv("MOEPACK_BUILD_TIMEOUT", "soon")
    with pytest.raises(KernelUnavailableError, match="MOEPACK_BUILD_TIMEOUT"):
        build_timeout()


def test_doctor_json():
    """`moepack doctor --json` builds (or reuses) the kernels, checks every ISA path against the
    reference and names the path in use."""
    res = subprocess.run([sys.executable, "-m", "moepack.cli.app", "doctor", "--json"], capture_output=True,
                         text=True, timeout=900)
    assert res.returncode in (0, 1), res.stderr
    info = json.loads(res.stdout)
    assert info["torch"] == torch.__version__ and info["threads"] == torch.get_num_threads()
    assert info["cuda_available"] is torch.cuda.is_available()
    if info["cpp"]["available"]:
        assert res.returncode == 0, info
        assert info["isa"].startswith("cpp-") and info["isa"][4:] in info["cpp"]["isas"]
        assert info["checks"] and all(c["ok"] for c in info["checks"])
        assert {c["isa"] for c in info["checks"]} == set(info["cpp"]["isas"])
    else:
        assert info["isa"] == "torch" and info["cpp"]["reason"]
