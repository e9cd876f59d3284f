"""selfprune.io: JSONL torn-tail repair, atomic folders and their recovery, run locks between real
processes, and normal file permissions."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from selfprune.errors import SelfpruneError
from selfprune.io import (append_jsonl, atomic_directory, atomic_write_json, discard_on_failure, lock_path_for,
                          read_jsonl, restore_interrupted, run_lock)

REPO = Path(__file__).resolve().parents[1]


# -- JSONL ---------------------------------------------------------------------------------------------
def test_append_after_a_torn_tail_cuts_it_off_and_keeps_it_aside(tmp_path):
    path = tmp_path / "journal.jsonl"
    append_jsonl(path, {"index": 0})
    with open(path, "ab") as handle:
        handle.write(b'{"index": 1, "fitn')  # a writer killed mid-line
    assert read_jsonl(path) == [{"index": 0}]
    append_jsonl(path, {"index": 1})
    assert path.read_bytes() == b'{"index": 0}\n{"index": 1}\n'
    with open(path, "ab") as handle:
        handle.write(b'{"ind')
    append_jsonl(path, {"index": 2})
    assert read_jsonl(path) == [{"index": 0}, {"index": 1}, {"index": 2}]
    # both fragments kept, appended one per line
    assert (tmp_path / "journal.jsonl.torn").read_bytes() == b'{"index": 1, "fitn\n{"ind\n'


def test_a_whole_record_missing_only_its_newline_is_kept(tmp_path):
    path = tmp_path / "j.jsonl"
    path.write_bytes(b'{"a": 1}\n{"a": 2}')
    assert read_jsonl(path) == [{"a": 1}, {"a": 2}]
    append_jsonl(path, {"a": 3})
    assert read_jsonl(path) == [{"a": 1}, {"a": 2}, {"a": 3}]
    assert not (tmp_path / "j.jsonl.torn").exists()


def test_a_torn_file_without_any_complete_line(tmp_path):
    path = tmp_path / "j.jsonl"
    path.write_bytes(b'{"a": ' + b"x" * 10000)  # longer than one read-back block
    assert read_jsonl(path) == []
    append_jsonl(path, {"a": 1})
    assert path.read_bytes() == b'{"a": 1}\n'
    assert len((tmp_path / "j.jsonl.torn").read_bytes()) == 10007


def test_a_damaged_line_before_valid_ones_is_an_error_naming_file_and_line(tmp_path):
    path = tmp_path / "journal.jsonl"
    path.write_bytes(b'{"a": 1}\n\ngarbage{\n{"a": 2}\n')
    with pytest.raises(SelfpruneError) as err:
        read_jsonl(path)
    message = str(err.value)
    assert str(path) in message and "line 3" in message and "\n" not in message


def test_missing_file_reads_as_empty(tmp_path):
    assert read_jsonl(tmp_path / "none.jsonl") == []


# -- permissions -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_outputs_get_the_umask_s_normal_permissions(tmp_path, umask):
    previous = os.umask(umask)
    try:
        atomic_write_json(tmp_path / "result.json", {"x": 1})
        append_jsonl(tmp_path / "journal.jsonl", {"x": 1})
        with atomic_directory(tmp_path / "model") as folder:
            atomic_write_json(folder / "config.json", {})
            (folder / "weights.bin").write_bytes(b"0")
            (folder / "weights.bin").chmod(0o600)  # as safetensors writes through transformers
    finally:
        os.umask(previous)
    mode = lambda p: (tmp_path / p).stat().st_mode & 0o777  # noqa: E731
    assert mode("result.json") == 0o666 & ~umask
    assert mode("journal.jsonl") == 0o666 & ~umask
    assert mode("model") == 0o777 & ~umask
    assert mode("model/config.json") == mode("model/weights.bin") == 0o666 & ~umask


def test_rewriting_a_file_keeps_its_mode(tmp_path):
    path = tmp_path / "best.json"
    atomic_write_json(path, {"v": 1})
    path.chmod(0o640)
    atomic_write_json(path, {"v": 2})
    assert path.stat().st_mode & 0o777 == 0o640 and json.loads(path.read_text()) == {"v": 2}


# -- atomic folders ---------------------------------------------------------------------------------------
def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_overwrite_keeps_the_old_folder_until_the_new_one_is_complete(tmp_path):
    out = tmp_path / "out"
    with atomic_directory(out) as folder:
        (folder / "v").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_directory(out, overwrite=True) as folder:
            (folder / "v").write_text("half")
            raise RuntimeError("failed mid-save")
    assert (out / "v").read_text() == "old" and _leftovers(tmp_path) == []
    with atomic_directory(out, overwrite=True) as folder:
        (folder / "v").write_text("new")
        assert (out / "v").read_text() == "old"  # still there while the new one is written
    assert (out / "v").read_text() == "new" and _leftovers(tmp_path) == []


def test_existing_folder_without_overwrite_is_refused_untouched(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine").write_text("keep")
    with pytest.raises(SelfpruneError, match="already exists.*overwrite=True"):
        with atomic_directory(out):
            pass
    assert (out / "mine").read_text() == "keep" and _leftovers(tmp_path) == []


def test_leftovers_of_a_killed_swap_are_restored_or_cleaned(tmp_path):
    # What a SIGKILL between "old renamed aside" and "new renamed in" leaves behind (pids of dead processes).
    out = tmp_path / "out"
    (tmp_path / ".out.old.999991").mkdir()
    (tmp_path / ".out.old.999991" / "v").write_text("old")
    (tmp_path / ".out.partial.999991").mkdir()
    (tmp_path / ".out.partial.999992").mkdir()
    (tmp_path / ".outer.partial.5").mkdir()  # another target's: not ours to touch
    assert restore_interrupted(out)
    assert (out / "v").read_text() == "old"
    with atomic_directory(out, overwrite=True) as folder:
        (folder / "v").write_text("new")
    assert (out / "v").read_text() == "new"
    assert _leftovers(tmp_path) == [".outer.partial.5"]


def test_an_old_folder_left_after_a_finished_swap_is_removed(tmp_path):
    # A SIGKILL after "new renamed in", before "old deleted": the new folder stays, the old one goes.
    out = tmp_path / "out"
    out.mkdir()
    (out / "v").write_text("new")
    (tmp_path / ".out.old.999991").mkdir()
    assert restore_interrupted(out)
    with atomic_directory(out, overwrite=True) as folder:
        assert (out / "v").read_text() == "new"
        (folder / "v").write_text("newer")
    assert (out / "v").read_text() == "newer" and _leftovers(tmp_path) == []


# -- run locks between processes ---------------------------------------------------------------------------
HOLDER = textwrap.dedent("""
    import sys, time
    from selfprune.io import run_lock
    with run_lock(sys.argv[1], command="selfprune search --out run"):
        print("locked", flush=True)
        time.sleep(120)
""")


def _start_holder(path: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_process_is_refused_with_the_holder_named(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "journal.jsonl").write_text("{}\n")
    holder = _start_holder(run)
    try:
        with pytest.raises(SelfpruneError) as err:
            with run_lock(run):
                pass
        message = str(err.value)
        assert f"in use by pid {holder.pid}" in message and "selfprune search --out run" in message
        assert "since " in message and "\n" not in message
        # an overwrite of the folder in use is refused too, and leaves it alone
        with pytest.raises(SelfpruneError, match="in use by pid"):
            with atomic_directory(run, overwrite=True):
                pass
        assert (run / "journal.jsonl").read_text() == "{}\n"
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # the kernel drops the lock of a killed process: the next run goes ahead
    with run_lock(run):
        assert json.loads(lock_path_for(run).read_text())["pid"] == os.getpid()
    assert not lock_path_for(run).exists()


def test_the_lock_is_reentrant_within_one_process(tmp_path):
    out = tmp_path / "out"
    with run_lock(out):
        with atomic_directory(out) as folder:  # save_pruned inside a run that holds the lock
            (folder / "v").write_text("x")
        assert lock_path_for(out).exists()
    assert not lock_path_for(out).exists() and (out / "v").read_text() == "x"


def test_many_processes_racing_for_one_lock_never_hold_it_together(tmp_path):
    script = textwrap.dedent("""
        import os, sys, time
        from selfprune.errors import SelfpruneError
        from selfprune.io import run_lock
        wins = 0
        deadline = time.time() + 1
        while time.time() < deadline:
            try:
                with run_lock(sys.argv[1]):
                    fd = os.open(sys.argv[2], os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # fails if held twice
                    os.close(fd)
                    os.unlink(sys.argv[2])
                    wins += 1
            except SelfpruneError:
                time.sleep(0.001)
        print(wins)
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "run"), str(tmp_path / "inside")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)}) for _ in range(3)]
    outputs = [p.communicate(timeout=60) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-500:] for o in outputs]
    assert sum(int(o[0]) for o in outputs) > 3


# -- run folders --------------------------------------------------------------------------------------------
def test_a_run_that_failed_at_start_up_leaves_no_folder(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(SelfpruneError):
        with discard_on_failure(run):
            atomic_write_json(run / "config.json", {"model": "x"})
            raise SelfpruneError("OPENAI_API_KEY is not set")
    assert not run.exists()
    with pytest.raises(KeyboardInterrupt):
        with discard_on_failure(run):
            atomic_write_json(run / "config.json", {"model": "x"})
            append_jsonl(run / "journal.jsonl", {"index": 0})
            raise KeyboardInterrupt
    assert read_jsonl(run / "journal.jsonl") == [{"index": 0}]  # evaluated work is kept for --resume
