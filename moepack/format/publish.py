"""Publishing a pack without destroying anything: the output lock, what `--force` may replace, and the
recovery of writes that a killed process left behind (docs/format.md, writer obligations).

A writer of `DIR/NAME`
1. holds an exclusive lock on `DIR/.NAME.lock` (`flock`: the kernel drops it when the process dies, so a
   killed writer never leaves a stale lock) for the whole compress; a second writer of NAME refuses at once;
2. under the lock, recovers what an earlier, killed writer left (`recover_locked`) and refuses an output
   that is not a pack it may replace (`check_output`);
3. writes into `DIR/.NAME.partial-PID`, manifest last, fsyncs;
4. publishes: an existing pack is renamed to `DIR/.NAME.old-PID`, then the partial to NAME, then the old
   one is removed. The first rename is the commit point: a process killed after it is rolled forward (the
   new pack is complete), one killed before it is rolled back (the old pack stays, the partial goes).

`recover_replace(path)` is the entry point for readers (`run`, `verify`, ...): it does nothing, and creates
no file, unless leftovers of NAME exist, and then repairs under the lock and says what it did."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

from moepack.errors import MoepackError, OutputExistsError, OutputInUseError, PackWriteError
from moepack.format.constants import MANIFEST_MAGIC, MANIFEST_NAME, MAX_MANIFEST_BYTES
from moepack.procs import pid_alive

_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>partial|old)-(?P<pid>\d+)$")
_held: dict[str, list[int]] = {}  # lock path -> [fd, depth]: the lock is re-entrant within a process
_held_guard = threading.Lock()


def output_path(path: str | Path) -> Path:
    """The absolute, normalised output path (so `-o .` or `-o dir/..` name the folder they mean)."""
    p = Path(os.path.abspath(os.fspath(path)))
    if p.name in ("", ".", ".."):
        raise OutputExistsError("is not a name a pack can take; give a path such as NAME.moepack", path=path)
    return p


def hidden(path: Path, kind: str, pid: int | None = None) -> Path:
    """`DIR/.NAME.partial-PID`, `DIR/.NAME.old-PID` or (kind "lock") `DIR/.NAME.lock`."""
    suffix = "lock" if kind == "lock" else f"{kind}-{os.getpid() if pid is None else pid}"
    return path.with_name(f".{path.name}.{suffix}")


def write_error(exc: OSError, path: Path, doing: str) -> PackWriteError:
    """A typed error for an OSError met while writing the pack at `path`."""
    where = exc.filename or path
    if exc.errno == errno.ENOSPC:
        why = f"no space left on the device while {doing}; free some space or write elsewhere with -o"
    elif exc.errno == getattr(errno, "EDQUOT", -1):
        why = f"disk quota exceeded while {doing}; free some space or write elsewhere with -o"
    elif exc.errno in (errno.EACCES, errno.EPERM):
        why = f"permission denied while {doing}; write into a folder you can write with -o"
    elif exc.errno == errno.EROFS:
        why = f"read-only file system while {doing}; write elsewhere with -o"
    else:
        why = f"{doing} failed: {exc.strerror or exc}"
    return PackWriteError(why, path=where)


# -- the lock ------------------------------------------------------------------------------------------
class OutputLock:
    """An exclusive, non-blocking, per-process re-entrant lock on an output path (`with OutputLock(p):`).

    The lock file is unlinked on release; `acquire` checks that the file it locked is still the one at the
    path (a releasing holder may have unlinked it in between) and retries if not."""

    def __init__(self, path: str | Path):
        self.path = output_path(path)
        self.file = hidden(self.path, "lock")

    def acquire(self) -> OutputLock:
        key = str(self.file)
        with _held_guard:
            if key in _held:
                _held[key][1] += 1
                return self
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                while True:
                    fd = os.open(key, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        os.close(fd)
                        raise OutputInUseError(f"another moepack compress is writing this pack right now (it holds "
                                               f"{self.file.name}); wait for it to finish or choose another -o",
                                               path=self.path) from None
                    try:
                        here, now = os.fstat(fd), os.stat(key)
                        if (here.st_dev, here.st_ino) == (now.st_dev, now.st_ino):
                            break
                    except FileNotFoundError:
                        pass
                    os.close(fd)  # the holder unlinked it as we opened it: lock the new file
            except OSError as exc:
                raise write_error(exc, self.path, "creating the output's lock file") from None
            _held[key] = [fd, 1]
        return self

    def release(self) -> None:
        key = str(self.file)
        with _held_guard:
            entry = _held.get(key)
            if entry is None:
                return
            entry[1] -= 1
            if entry[1] > 0:
                return
            del _held[key]
            try:
                os.unlink(key)  # still locked by us: nobody else can be holding this file
            except OSError:
                pass
            os.close(entry[0])

    def held_here(self) -> bool:
        return str(self.file) in _held

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# -- what may be replaced ------------------------------------------------------------------------------
def read_pack_manifest(folder: Path) -> dict | None:
    """The manifest of `folder` when it is a moepack pack (a regular manifest.json with the moepack magic)."""
    manifest = folder / MANIFEST_NAME
    try:
        if manifest.is_symlink() or not manifest.is_file() or manifest.stat().st_size > MAX_MANIFEST_BYTES:
            return None
        obj = json.loads(manifest.read_bytes())
    except (OSError, ValueError, RecursionError):
        return None
    return obj if isinstance(obj, dict) and obj.get("magic") == MANIFEST_MAGIC else None


def check_output(path: Path, force: bool) -> None:
    """Refuse an output path that exists unless it is a moepack pack and `force` is set. Never deletes."""
    if not os.path.lexists(path):
        return
    only = "--force replaces only a pack moepack wrote; move it away or choose another -o"
    if path.is_symlink():
        raise OutputExistsError(f"is a symbolic link, not a moepack pack; {only}", path=path)
    if not path.is_dir():
        raise OutputExistsError(f"exists and is not a moepack pack (not a folder); {only}", path=path)
    manifest = read_pack_manifest(path)
    if manifest is None:
        raise OutputExistsError(f"exists and is not a moepack pack (no manifest.json with the moepack magic); "
                                f"{only}", path=path)
    files, shards = manifest.get("files"), manifest.get("shards")
    names = [MANIFEST_NAME, *(files if isinstance(files, list) else []),
             *(s.get("name") for s in (shards if isinstance(shards, list) else []) if isinstance(s, dict))]
    try:
        extra = sorted(set(os.listdir(path)) - {n for n in names if isinstance(n, str)})
    except OSError as exc:
        raise write_error(exc, path, "reading the existing pack") from None
    if extra:
        shown = ", ".join(extra[:3]) + (f" and {len(extra) - 3} more" if len(extra) > 3 else "")
        raise OutputExistsError(f"is a pack folder that also holds files the pack does not list ({shown}); "
                                f"--force would delete them: move them out or choose another -o", path=path)
    if not force:
        raise OutputExistsError("already exists; pass --force to replace it", path=path)


# -- recovery ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Leftover:
    kind: str  # "partial" or "old"
    pid: int
    path: Path


def leftovers(path: Path) -> list[Leftover]:
    """The hidden `.NAME.partial-PID` / `.NAME.old-PID` siblings of `path` that a moepack writer made, oldest
    PID first. Anything else with such a name is not touched (see `_made_by_writer`)."""
    try:
        names = os.listdir(path.parent)
    except OSError:
        return []
    out = []
    for n in names:
        m = _LEFTOVER.match(n)
        if m and m["name"] == path.name:
            f = Leftover(m["kind"], int(m["pid"]), path.parent / n)
            if _made_by_writer(f):
                out.append(f)
    return sorted(out, key=lambda f: (f.pid, f.kind))


def _made_by_writer(f: Leftover) -> bool:
    """A real folder of regular files only, with no manifest (a partial not yet finished, or an old pack
    half removed) or a moepack one. A user's `.notes.old-2` folder of folders is never touched, and only an
    old pack with its manifest is ever put back (recover_locked)."""
    if f.path.is_symlink() or not f.path.is_dir():
        return False
    try:
        entries = list(os.scandir(f.path))
    except OSError:
        return False
    if not all(e.is_file(follow_symlinks=False) for e in entries):
        return False
    return not any(e.name == MANIFEST_NAME for e in entries) or read_pack_manifest(f.path) is not None


def remove_tree(path: Path) -> bool:
    """Remove a folder (or file) as far as possible, going on past entries that fail; True when it is gone."""
    for _ in range(2):  # a second pass catches what a racing failure (a busy file, EINTR) left
        if not os.path.lexists(path):
            return True
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            try:
                path.unlink()
            except OSError:
                pass
    return not os.path.lexists(path)


def recover_locked(path: Path) -> str | None:
    """Repair what killed writers of `path` left; the caller holds `OutputLock(path)` (so no live writer owns
    any of it). A message saying what was done, or None when there was nothing to do."""
    found = leftovers(path)
    if not found:
        return None
    done: list[str] = []
    if not os.path.lexists(path):
        olds = {f.pid: f for f in found if f.kind == "old" and read_pack_manifest(f.path) is not None}
        committed = [f for f in found if f.kind == "partial" and f.pid in olds and read_pack_manifest(f.path)]
        chosen = None
        try:
            if committed:  # killed between the two renames: the new pack is complete, finish the replace
                chosen = committed[-1]
                os.replace(chosen.path, path)
                done.append(f"completed a replace interrupted by a killed process ({chosen.pid}): the new pack is "
                            f"in place")
            elif olds:  # the old pack was set aside but the new one is not complete: put the old one back
                chosen = max(olds.values(), key=lambda f: f.path.stat().st_mtime)
                os.replace(chosen.path, path)
                done.append(f"restored the previous pack, set aside by a replace that was killed ({chosen.pid})")
        except OSError as exc:
            raise write_error(exc, path, "recovering an interrupted replace") from None
        found = [f for f in found if chosen is None or f.path != chosen.path]
    failed = [f for f in found if not remove_tree(f.path)]
    done += [f"could not remove {f.path.name}; remove it by hand" for f in failed]
    stale = [f for f in found if f.kind == "partial" and f not in failed]
    if stale:
        pids = ", ".join(str(f.pid) for f in stale)
        done.append(f"removed {len(stale)} unfinished write{'s' * (len(stale) > 1)} left by killed process"
                    f"{'es' * (len(stale) > 1)} ({pids})")
    if any(f.kind == "old" and f not in failed for f in found):
        done.append("removed what a killed replace left of the previous pack")
    return f"{path}: " + "; ".join(done) if done else None


def recover_replace(path: str | Path) -> str | None:
    """Restore or complete a replace of the pack at `path` that a killed compress left half done, and remove
    its unfinished writes. Returns what was done (for the user), or None when nothing was left behind, when a
    live compress owns the leftovers, or when this process is writing `path` itself. Cheap when there is
    nothing to do: one listing of the parent folder, no file created. PackWriteError when the pack is missing
    and cannot be put back (for instance a read-only folder)."""
    path = Path(os.path.abspath(os.fspath(path)))
    if path.name in ("", ".", "..") or not leftovers(path):
        return None
    lock = OutputLock(path)
    if lock.held_here():
        return None
    try:
        lock.acquire()
    except OutputInUseError:
        return None
    except PackWriteError:
        if read_pack_manifest(path) is not None:
            return None  # an intact pack in a folder we cannot write: leave the leftovers alone
        raise
    try:
        return recover_locked(path)
    finally:
        lock.release()


def sweep_stale(folder: Path, *, skip: str | None = None) -> list[str]:
    """Recover every `*.moepack` in `folder` whose leftovers belong to processes that are gone (the next
    compress into a folder cleans up after killed ones). Messages for what was done."""
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    targets = {m["name"] for n in names if (m := _LEFTOVER.match(n)) and m["name"] != skip
               and m["name"].endswith(".moepack") and not pid_alive(int(m["pid"]))}
    out = []
    for name in sorted(targets):
        try:
            msg = recover_replace(folder / name)
        except MoepackError:
            continue  # another pack's trouble is reported when that pack is used
        if msg:
            out.append(msg)
    return out


