"""Crash-safe writes: atomic files and folders, torn-tail-tolerant JSONL journals, and run locks.

Every result or run-state file goes through this module, so that a killed process (``kill -9``
included) leaves either the old content or the new one, never a mix, and the next run can continue.
Files and folders get the permissions the user's umask gives (``0o666`` / ``0o777`` minus umask), not the
private modes of ``tempfile``.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import socket
import stat
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from .errors import SelfpruneError

log = logging.getLogger(__name__)

# Test-only: ``SELFPRUNE_FAULT=<point>:<marker file>`` makes the process write the marker and sleep at
# <point> of an atomic_directory swap, so that a test can SIGKILL it at a known moment.
FAULT_ENV = "SELFPRUNE_FAULT"
FAULT_POINTS = ("writing", "swapping", "cleanup")
TORN_SUFFIX = ".torn"


def _fault_point(point: str) -> None:
    spec = os.environ.get(FAULT_ENV, "")
    name, _, marker = spec.partition(":")
    if name != point or not marker:
        return
    Path(marker).write_text(str(os.getpid()))
    while True:  # wait for the test's SIGKILL
        time.sleep(60)


# -- permissions ----------------------------------------------------------------------------------------
def _umask() -> int:
    """The process umask, read without changing it where Linux allows (os.umask alone must set it)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_file_mode() -> int:
    """The mode ``open()`` would give a new file: 0o666 minus the umask."""
    return 0o666 & ~_umask()


def normalize_permissions(folder: Path) -> None:
    """Give the files and folders under ``folder`` the umask's normal modes: some writers (safetensors
    through transformers, tempfile) create private 0o600 files that other users of a shared model
    could not read. Execute bits are kept where the umask allows them."""
    umask = _umask()
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~umask)
        for name in files:
            file = os.path.join(root, name)
            if os.path.islink(file):
                continue
            executable = stat.S_IMODE(os.lstat(file).st_mode) & 0o111
            os.chmod(file, (0o666 | executable) & ~umask)


def _fsync_directory(folder: Path) -> None:
    """Make a rename inside ``folder`` durable (best effort: not every file system can open folders)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _unwritable(path: Path, exc: OSError) -> SelfpruneError:
    reason = exc.strerror or type(exc).__name__
    return SelfpruneError(f"cannot write {path} ({reason}): choose a writable location")


# -- what a path the user gave must be -------------------------------------------------------------------
def expect_file(path: str | os.PathLike, what: str, fix: str) -> Path:
    """``path`` as an existing, readable, non-empty regular file, or one line saying what it is instead: missing,
    a folder, a device / pipe / socket, empty, unreadable. ``what`` names it ("rates file"); ``fix`` says what
    to give instead."""
    path = Path(path).expanduser()
    if not os.path.lexists(path) or (path.is_symlink() and not path.exists()):
        raise SelfpruneError(f"{what} {path} does not exist: {fix}")
    if path.is_dir():
        raise SelfpruneError(f"{what} {path} is a folder, not a file: {fix}")
    if not path.is_file():
        raise SelfpruneError(f"{what} {path} is not a regular file (a device, pipe or socket): {fix}")
    if path.stat().st_size == 0:
        raise SelfpruneError(f"{what} {path} is empty: {fix}")
    try:
        with open(path, "rb") as handle:
            handle.read(1)
    except OSError as exc:
        raise SelfpruneError(f"{what} {path} cannot be read ({exc.strerror}): {fix}") from None
    return path


def expect_folder(path: str | os.PathLike, what: str, fix: str) -> Path:
    """``path`` as an existing folder, or one line saying that it is missing or is a file."""
    path = Path(path).expanduser()
    if not path.exists():
        raise SelfpruneError(f"{what} {path} does not exist: {fix}")
    if not path.is_dir():
        raise SelfpruneError(f"{what} {path} is a file, not a folder: {fix}")
    return path


# -- files ----------------------------------------------------------------------------------------------
def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and an atomic rename.

    A new file gets the umask's normal mode; an existing file keeps its mode.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        mode = stat.S_IMODE(path.stat().st_mode) if path.is_file() else default_file_mode()
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise _unwritable(path, exc) from None
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), mode)  # mkstemp creates 0o600
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise _unwritable(path, exc) from None
        raise
    _fsync_directory(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


# -- JSONL journals -------------------------------------------------------------------------------------
def _valid_json(data: bytes) -> bool:
    try:
        json.loads(data)
        return True
    except (ValueError, UnicodeDecodeError):
        return False


def _repair_tail(handle) -> None:
    """If the file does not end in a newline (a writer was killed mid-line), cut the torn line off and
    append it to ``<name>.torn``; a line that is whole JSON and only lacks its newline is completed.

    Reads only the file's last line, never the whole file.
    """
    size = handle.seek(0, os.SEEK_END)
    if size == 0:
        return
    handle.seek(size - 1)
    if handle.read(1) == b"\n":
        return
    start, chunk = size, 4096
    while start > 0:  # walk back to the last complete line
        begin = max(0, start - chunk)
        handle.seek(begin)
        block = handle.read(start - begin)
        cut = block.rfind(b"\n")
        if cut >= 0:
            start = begin + cut + 1
            break
        start = begin
    handle.seek(start)
    fragment = handle.read(size - start)
    if _valid_json(fragment):
        handle.write(b"\n")
        return
    name = getattr(handle, "name", "journal")
    torn = Path(f"{name}{TORN_SUFFIX}")
    with open(torn, "ab") as side:
        side.write(fragment + b"\n")
        side.flush()
        os.fsync(side.fileno())
    handle.truncate(start)
    log.warning("%s ended in a torn line (%d bytes, kept in %s): removed it", name, len(fragment), torn)


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one JSON line and fsync it: a record is either whole on disk or absent.

    A torn last line left by a killed writer is repaired first, so the new record starts on its own line.
    """
    line = (json.dumps(record, default=str) + "\n").encode("utf-8")
    path = Path(path)
    try:
        handle = open(path, "ab+")  # appends always go to the end; reading/truncating the tail still works
    except OSError as exc:
        raise _unwritable(path, exc) from None
    with handle:
        _repair_tail(handle)
        handle.write(line)
        handle.flush()
        os.fsync(handle.fileno())


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a JSONL file; a torn last line (no newline, left by a killed writer) is ignored.

    A damaged line followed by valid lines is no torn write: that is an error naming the file and line.
    """
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    lines = data.split(b"\n")
    torn_tail = lines.pop()  # b"" when the file ends in a newline
    records = []
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            records.append(json.loads(raw))
        except (ValueError, UnicodeDecodeError) as exc:
            reason = getattr(exc, "msg", None) or type(exc).__name__
            raise SelfpruneError(
                f"{path} line {number} is not valid JSON ({reason}): the file was damaged or edited; "
                f"repair or delete that line"
            ) from None
    if torn_tail.strip() and _valid_json(torn_tail):
        records.append(json.loads(torn_tail))  # whole record whose newline was not written yet
    return records


# -- run locks ------------------------------------------------------------------------------------------
_held_locks: dict[str, list] = {}  # lock file -> [fd, depth]; a process may nest locks on one path
_held_guard = threading.Lock()


def lock_path_for(path: str | os.PathLike) -> Path:
    """The lock file of an output or run folder: beside it, so that it survives the folder being
    replaced, and so that an ``--overwrite`` of a folder in use is refused too."""
    path = Path(path).absolute()
    return path.parent / f".{path.name}.lock"


def _command_line() -> str:
    argv = list(sys.argv) or ["python"]
    head = Path(argv[0]).name
    if head == "__main__.py":  # python -m selfprune
        head = Path(argv[0]).parent.name
    text = " ".join([head, *argv[1:]])
    return text if len(text) <= 120 else text[:117] + "..."


def _holder_text(fd: int) -> str:
    try:
        raw = os.pread(fd, 4096, 0)
        holder = json.loads(raw) if raw.strip() else {}
    except (OSError, ValueError):
        holder = {}
    if not holder.get("pid"):
        return "another process"
    where = "" if holder.get("host") == socket.gethostname() else f" on {holder.get('host')}"
    since = time.strftime("%H:%M", time.localtime(holder.get("started", 0)))
    return f"pid {holder['pid']}{where} ({holder.get('command') or '?'}, since {since})"


@contextmanager
def run_lock(path: str | os.PathLike, command: str | None = None) -> Iterator[Path]:
    """Hold an exclusive lock on ``path`` (a run or output folder, existing or not) for the block.

    The lock is an ``flock`` on ``.NAME.lock`` beside ``path``, which records the holder's pid, host,
    command line and start time; it is released by the kernel even when the process is killed. A second
    process gets a SelfpruneError naming the holder. Re-entrant within one process (``atomic_directory``
    takes it too, so wrapping a whole run in ``run_lock`` and saving inside it works).
    """
    target = Path(path)
    lock = lock_path_for(target)
    key = str(lock)
    with _held_guard:
        if key in _held_locks:
            _held_locks[key][1] += 1
            nested = True
        else:
            nested = False
    if nested:
        try:
            yield target
        finally:
            with _held_guard:
                _held_locks[key][1] -= 1
        return
    fd = _acquire(lock, target)
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "command": command or _command_line(),
              "started": time.time(), "path": str(target)}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(holder).encode("utf-8"), 0)
    with _held_guard:
        _held_locks[key] = [fd, 1]
    try:
        yield target
    finally:
        with _held_guard:
            _held_locks[key][1] -= 1
            last = _held_locks[key][1] == 0
            if last:
                del _held_locks[key]
        if last:
            # Unlink while still holding the lock; a waiter that opened the old file sees it is gone.
            try:
                os.unlink(lock)
            except OSError:
                pass
            os.close(fd)


def _acquire(lock: Path, target: Path) -> int:
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _unwritable(target, exc) from None
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            raise _unwritable(target, exc) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder_text(fd)
            os.close(fd)
            raise SelfpruneError(
                f"{target} is in use by {holder}: wait for it to finish or stop it, then retry"
            ) from None
        try:
            same_file = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same_file = False
        if same_file:
            return fd
        os.close(fd)  # the previous holder removed this file as we opened it: lock the new one


def _stale_file_siblings(path: Path) -> list[Path]:
    """Temporary files a writer of ``path`` makes beside it (``.NAME.*.partial``, ``.NAME.*.tmp``)."""
    prefix = f".{path.name}."
    if not path.parent.is_dir():
        return []
    return [path.parent / n for n in os.listdir(path.parent)
            if n.startswith(prefix) and n.endswith((".partial", ".tmp")) and (path.parent / n).is_file()]


@contextmanager
def output_lock(path: str | os.PathLike, command: str | None = None) -> Iterator[Path]:
    """Hold ``run_lock`` on an output file for a whole command (a second writer of the same file is refused at
    once, not after its work), and first remove the temporary files a killed writer of it left: with the lock
    held, no live writer of this file owns one."""
    with run_lock(path, command) as target:
        for stale in _stale_file_siblings(Path(path)):
            try:
                stale.unlink()
                log.info("removed %s, left by an interrupted writer", stale)
            except FileNotFoundError:
                pass
        yield target


# -- folders --------------------------------------------------------------------------------------------
def _siblings(path: Path, kind: str) -> list[Path]:
    """``.NAME.<kind>.<pid>`` folders beside ``path`` (the pid suffix keeps other names out)."""
    prefix = f".{path.name}.{kind}."
    if not path.parent.is_dir():
        return []
    return [path.parent / n for n in os.listdir(path.parent)
            if n.startswith(prefix) and n[len(prefix):].isdigit()]


def recover_directory(path: str | os.PathLike) -> None:
    """Clean up after a killed ``atomic_directory``: call with ``run_lock(path)`` held.

    A missing ``path`` with an ``.NAME.old.*`` beside it (killed mid-swap) gets the old folder back;
    every other ``.NAME.partial.*`` / ``.NAME.old.*`` is a dead process's leftover and is removed.
    """
    path = Path(path)
    olds = sorted(_siblings(path, "old"), key=lambda p: p.stat().st_mtime)
    if olds and not os.path.lexists(path):
        os.rename(olds.pop(), path)
        log.warning("restored %s from an interrupted replace", path)
    for stale in olds + _siblings(path, "partial"):
        shutil.rmtree(stale, ignore_errors=True)


def restore_interrupted(path: str | os.PathLike) -> bool:
    """Put a folder back that a killed replace left renamed aside (``path`` missing, ``.NAME.old.*``
    present); returns whether ``path`` exists now. Call before reading a folder that may be missing."""
    path = Path(path)
    if os.path.lexists(path) or not _siblings(path, "old"):
        return os.path.lexists(path)
    with run_lock(path):
        recover_directory(path)
    return os.path.lexists(path)


@contextmanager
def atomic_directory(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh sibling folder to fill; when the block ends it replaces ``path`` atomically.

    The new folder is complete before the old one goes: ``.NAME.partial.<pid>`` is written, the old
    ``path`` is renamed to ``.NAME.old.<pid>``, the new one renamed in, then the old one deleted. A kill at
    any point leaves a loadable ``path`` (old or new); the next call cleans up. On an exception the
    partial folder is removed and ``path`` is untouched. Holds ``run_lock(path)`` throughout.
    """
    path = Path(path)
    with run_lock(path):
        try:
            recover_directory(path)
        except OSError as exc:
            raise _unwritable(path, exc) from None
        if os.path.lexists(path):
            if not path.is_dir():
                raise SelfpruneError(f"{path} exists and is not a folder: choose another output folder")
            if not overwrite:
                raise SelfpruneError(f"output folder {path} already exists: choose another one or allow "
                                     f"overwriting it (overwrite=True)")
        pid = os.getpid()
        partial = path.parent / f".{path.name}.partial.{pid}"
        old = path.parent / f".{path.name}.old.{pid}"
        try:
            partial.mkdir()  # the umask's normal mode, unlike mkdtemp's 0o700
        except OSError as exc:
            raise _unwritable(path, exc) from None
        moved_aside = False
        try:
            yield partial
            normalize_permissions(partial)
            _fault_point("writing")
            if path.exists():
                os.rename(path, old)
                moved_aside = True
                _fault_point("swapping")
            os.rename(partial, path)
            _fsync_directory(path.parent)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            if moved_aside and not os.path.lexists(path):
                os.rename(old, path)
            raise
        if moved_aside:
            _fault_point("cleanup")
            shutil.rmtree(old, ignore_errors=True)


# -- run folders ----------------------------------------------------------------------------------------
SETUP_FILES = ("config.json",)


def is_unstarted_run(run_dir: str | os.PathLike, setup_files=SETUP_FILES) -> bool:
    """True when ``run_dir`` holds nothing but the files written at set-up (no evaluation yet)."""
    run_dir = Path(run_dir)
    return run_dir.is_dir() and all(p.name in setup_files for p in run_dir.iterdir())


@contextmanager
def discard_on_failure(run_dir: str | os.PathLike, setup_files=SETUP_FILES) -> Iterator[Path]:
    """Wrap the start of a NEW run: if the block fails while ``run_dir`` holds only its set-up files
    (e.g. ``config.json``; the model failed to load or the LLM key is missing), remove ``run_dir`` so
    that retrying with the same output folder is not refused. A run that evaluated anything is kept
    (it can be resumed). Not for ``--resume``: an existing run is never removed.

    Use: ``with run_lock(out), discard_on_failure(out): create_run_dir(out, config); execute(...)``.
    """
    run_dir = Path(run_dir)
    try:
        yield run_dir
    except BaseException:
        if is_unstarted_run(run_dir, setup_files):
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
