"""Files several processes share: atomic writes under concurrent writers and readers, and the
exclusive lock's fallback where the filesystem refuses flock (stale holders, other hosts)."""

import errno
import fcntl
import json
import os
import socket
import subprocess
import sys

import pytest

from facenet_jax import runfiles

# Writes one of two large JSON payloads (its argv[2]) to argv[1] many times.
WRITER = """
import sys
from facenet_jax import runfiles
path, tag = sys.argv[1:]
payload = {"tag": tag, "filler": tag * 200_000}
for _ in range(60):
    runfiles.atomic_write_json(path, payload)
"""


def test_concurrent_writers_leave_and_show_only_whole_files(tmp_path):
    """Two processes rewrite one record while this one reads it: every read is one writer's
    complete file (a plain write_text shows torn, half-written files here)."""
    path = tmp_path / "sweep_status.json"
    runfiles.atomic_write_json(path, {"tag": "start", "filler": ""})
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), tag])
               for tag in ("a", "b")]
    reads = set()
    while any(w.poll() is None for w in writers):
        record = json.loads(path.read_text())  # raises on a torn file
        assert record["filler"] == record["tag"] * (200_000 if record["tag"] != "start" else 0)
        reads.add(record["tag"])
    assert [w.returncode for w in writers] == [0, 0]
    assert json.loads(path.read_text())["tag"] in ("a", "b")
    assert reads & {"a", "b"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep_status.json"]  # no leftovers


def _refuse(code):
    def flock(handle, operation):
        raise OSError(code, os.strerror(code))
    return flock


def test_a_failed_write_leaves_the_old_file_whole(tmp_path):
    """atomic_write_with: a writer that raises midway (a cut-off np.savez) leaves the earlier
    file byte for byte and no temporary file; a writer that finishes replaces it."""
    import numpy as np

    path = tmp_path / "embeddings.npz"
    runfiles.atomic_write_with(path, lambda f: np.savez(f, x=np.arange(3)))
    before = path.read_bytes()

    def cut_off(f):
        f.write(b"PK\x03\x04 half an archive")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        runfiles.atomic_write_with(path, cut_off)
    assert path.read_bytes() == before and list(tmp_path.iterdir()) == [path]
    runfiles.atomic_write_with(path, lambda f: np.savez(f, x=np.arange(5)))
    assert list(np.load(path)["x"]) == [0, 1, 2, 3, 4]


def test_flock_is_taken_where_the_filesystem_grants_it(tmp_path):
    with runfiles.exclusive_lock(tmp_path / ".lock", what="training in X") as kind:
        assert kind == "flock"
        assert (tmp_path / ".lock").read_text() == f"{os.getpid()}\n"
    assert not (tmp_path / f".lock{runfiles.FALLBACK_SUFFIX}").exists()


@pytest.mark.parametrize("code", [errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK])
def test_refused_flock_falls_back_to_a_lock_file_naming_its_holder(tmp_path, code):
    lock = tmp_path / ".lock"
    fallback = tmp_path / f".lock{runfiles.FALLBACK_SUFFIX}"
    with runfiles.exclusive_lock(lock, what="training in X", flock=_refuse(code)) as kind:
        assert kind == "lock file"
        holder = json.loads(fallback.read_text())
        assert (holder["host"], holder["pid"]) == (socket.gethostname(), os.getpid())
        # A second taker (this process stands in for another one: its pid is alive).
        with pytest.raises(runfiles.LockHeldError,
                           match=rf"another process \(pid {os.getpid()} on host .*\) is "
                                 r"training in X: the filesystem refused flock"):
            with runfiles.exclusive_lock(lock, what="training in X", flock=_refuse(code)):
                pass
        assert fallback.exists()  # the refused taker did not remove the holder's file
    assert not fallback.exists()


def test_a_stale_lock_file_of_a_dead_process_on_this_host_is_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    fallback = tmp_path / f".lock{runfiles.FALLBACK_SUFFIX}"
    fallback.write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid,
                                    "started": "earlier"}))
    with runfiles.exclusive_lock(tmp_path / ".lock", what="x",
                                 flock=_refuse(errno.ENOSYS)) as kind:
        assert kind == "lock file" and json.loads(fallback.read_text())["pid"] == os.getpid()
    assert not fallback.exists()


@pytest.mark.parametrize("holder", [{"host": "node-17", "pid": 1, "started": "t"}, None])
def test_a_lock_file_that_cannot_be_checked_is_never_taken_over(tmp_path, holder):
    """Another host's pid cannot be checked from here, nor can an unreadable file: the error
    names the file to delete once no such process runs."""
    fallback = tmp_path / f".lock{runfiles.FALLBACK_SUFFIX}"
    fallback.write_text(json.dumps(holder) if holder else "{tor")
    with pytest.raises(runfiles.LockHeldError, match=rf"delete {fallback} and re-run"):
        with runfiles.exclusive_lock(tmp_path / ".lock", what="x", flock=_refuse(errno.ENOSYS)):
            pass
    assert fallback.read_text() == (json.dumps(holder) if holder else "{tor")


def test_is_stale_only_for_a_dead_pid_on_this_host():
    here = {"host": "a", "pid": 12, "started": "t"}
    assert runfiles.is_stale(here, "a", alive=lambda pid: False) is True
    assert runfiles.is_stale(here, "a", alive=lambda pid: True) is False
    assert runfiles.is_stale(here, "b", alive=lambda pid: False) is False
    assert runfiles.is_stale(None, "a", alive=lambda pid: False) is False


def test_other_flock_errors_are_not_mistaken_for_a_refusal(tmp_path):
    with pytest.raises(OSError) as error:
        with runfiles.exclusive_lock(tmp_path / ".lock", what="x", flock=_refuse(errno.EBADF)):
            pass
    assert error.value.errno == errno.EBADF
    assert not (tmp_path / f".lock{runfiles.FALLBACK_SUFFIX}").exists()


def test_a_held_flock_names_the_holder(tmp_path):
    with open(tmp_path / ".lock", "a+") as running:
        fcntl.flock(running, fcntl.LOCK_EX | fcntl.LOCK_NB)
        running.write("4242\n")
        running.flush()
        with pytest.raises(runfiles.LockHeldError, match=r"another process \(pid 4242\) is x"):
            with runfiles.exclusive_lock(tmp_path / ".lock", what="x"):
                pass


def test_train_says_which_workdir_lock_it_took(tmp_path, monkeypatch, caplog):
    import logging

    run = tmp_path / "run"
    run.mkdir()
    with caplog.at_level(logging.INFO), runfiles.exclusive_workdir(run, is_writer=True):
        pass
    assert f"workdir lock: flock on {run / runfiles.LOCK_FILE}" in caplog.text
    real = runfiles.exclusive_lock
    monkeypatch.setattr(runfiles, "exclusive_lock", lambda path, *, what: real(
        path, what=what, flock=_refuse(errno.EOPNOTSUPP)))  # e.g. Lustre without -o flock
    with runfiles.exclusive_workdir(run, is_writer=True):
        assert "refused flock; took the lock file" in caplog.text
        assert (run / f"{runfiles.LOCK_FILE}{runfiles.FALLBACK_SUFFIX}").exists()
        with pytest.raises(RuntimeError, match=r"is training in .*run: the filesystem refused "
                                               r"flock.*or use another --workdir"):
            with runfiles.exclusive_workdir(run, is_writer=True):
                pass
    assert not (run / f"{runfiles.LOCK_FILE}{runfiles.FALLBACK_SUFFIX}").exists()
