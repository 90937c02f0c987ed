"""Files that several processes share: atomic writes and an exclusive lock on a folder.

Writes go to a temporary file unique to the writing process and thread, in the target's folder,
and are renamed over the target (`os.replace`, atomic on POSIX filesystems, NFS and Lustre
included): a reader sees the old file or the new one, never a torn one, and two writers of one
file at once leave one of their complete versions (the last rename wins).

The lock (`exclusive_lock`) is `flock` where the filesystem grants it: the kernel drops it when
its process dies, so it is never stale. Some cluster filesystems refuse flock (Lustre mounted
without its `flock` option answers ENOSYS or EOPNOTSUPP; some NFS setups ENOLCK). There the
lock is a file created with O_CREAT | O_EXCL (atomic on those filesystems too) that names its
holder's host and pid; it is removed when the holder ends normally. One left by a killed
process is stale: on the holder's own host the pid is checked and a dead holder's file is taken
over; from another host it cannot be checked, and the error says how to remove it by hand.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import pathlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

# errno values by which a filesystem refuses flock itself (as opposed to "held by another").
FLOCK_REFUSED = frozenset({errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK, errno.EINVAL})
FALLBACK_SUFFIX = ".excl"  # the O_EXCL lock file is the flock file's name + this


class LockHeldError(RuntimeError):
    """Another process holds the lock; the message names it and what to do."""


def atomic_write_bytes(path: str | pathlib.Path, payload: bytes) -> pathlib.Path:
    """Writes `payload` to `path` via a per-writer temporary file and a rename."""
    path = pathlib.Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())  # the rename must not land before the data on a crash
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_text(path: str | pathlib.Path, text: str) -> pathlib.Path:
    return atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | pathlib.Path, payload: Any) -> pathlib.Path:
    return atomic_write_text(path, json.dumps(payload, indent=2))


def lock_holder() -> dict[str, Any]:
    """Who takes a lock: {"host", "pid", "started"} (what a fallback lock file holds)."""
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %z")}


@contextlib.contextmanager
def exclusive_lock(path: str | pathlib.Path, *, what: str,
                   flock: Callable[[Any, int], None] = fcntl.flock) -> Iterator[str]:
    """Holds an exclusive, non-blocking lock on `path` for the `with` body; yields which kind
    was taken: "flock", or "lock file" (PATH.excl) where the filesystem refuses flock.

    `what` names the locked thing in errors ("training in DIR"). LockHeldError when another
    process holds it. `flock` is fcntl.flock; tests pass one that refuses.
    """
    path = pathlib.Path(path)
    with open(path, "a+") as handle:
        try:
            flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise LockHeldError(f"another process (pid {holder}) is {what}; wait for it to end "
                                "or stop it") from None
        except OSError as error:
            if error.errno not in FLOCK_REFUSED:
                raise
            refused = error
        else:
            handle.seek(0)
            handle.truncate()
            handle.write(f"{os.getpid()}\n")
            handle.flush()
            try:
                yield "flock"
            finally:
                handle.truncate(0)  # no stale pid once this run is over
            return
    with _lock_file(path.with_name(path.name + FALLBACK_SUFFIX), what=what, refused=refused):
        yield "lock file"


@contextlib.contextmanager
def _lock_file(path: pathlib.Path, *, what: str, refused: OSError) -> Iterator[None]:
    """The O_EXCL fallback: create PATH holding lock_holder(), remove it on exit."""
    me = lock_holder()
    for attempt in range(2):  # a second try after removing a stale file
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read_holder(path)
            if attempt == 0 and is_stale(holder, me["host"]):
                path.unlink(missing_ok=True)
                continue
            raise LockHeldError(_held_message(path, holder, what, me["host"], refused)) from None
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(me))
        break
    try:
        yield
    finally:
        if _read_holder(path) == me:  # never remove a lock another process took over
            path.unlink(missing_ok=True)


def _read_holder(path: pathlib.Path) -> dict[str, Any] | None:
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def is_stale(holder: dict[str, Any] | None, host: str,
             alive: Callable[[int], bool] | None = None) -> bool:
    """A fallback lock file is stale when its holder ran on `host` (this one) and that pid is
    gone. Another host's holder cannot be checked from here: not stale. An unreadable file
    (a holder killed between creating and writing it) is not taken over either: the error
    names it."""
    if not holder or holder.get("host") != host or not isinstance(holder.get("pid"), int):
        return False
    return not (alive or _pid_alive)(holder["pid"])


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _held_message(path: pathlib.Path, holder: dict[str, Any] | None, what: str, host: str,
                  refused: OSError) -> str:
    who = (f"pid {holder.get('pid')} on host {holder.get('host')}, since "
           f"{holder.get('started')}" if holder else "a process that left it unreadable")
    check = ("" if holder and holder.get("host") == host else
             f"; if no such process runs any more (it cannot be checked from host {host}), "
             f"delete {path} and re-run")
    return (f"another process ({who}) is {what}: the filesystem refused flock "
            f"({os.strerror(refused.errno)}), so the lock is the file {path}; wait for that "
            f"process to end or stop it{check}")
