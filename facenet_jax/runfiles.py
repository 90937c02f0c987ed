"""The run folder: its file names, its lock, atomic writes, its config record, the resume checks.

A run folder DIR (the train CLI's --workdir, a sweep cell, one written by
`python -m facenet_jax.pretrained`) holds:

- CONFIG_FILE (config.json): {"config": the resolved config, "provenance": versions, commit,
  LAYOUT_VERSION, devices, "imported" for imported weights, "init_from" for a fine-tune};
  written at every start (`write_config`); every reader goes through `read_run_record`, which
  refuses a folder of another layout version (`check_layout`) rather than convert it;
- SPLIT_FILE (split.json): each split's identity names and each identity's image count, so a
  resume checks it sees the same data (also from a moved data.root); METRICS_FILE
  (metrics.jsonl) and TENSORBOARD_DIR: the training log;
- CHECKPOINT_DIR (checkpoints/STEP): orbax checkpoints; EVAL_FILE (eval.json) and
  VALIDATION_EVAL_FILE (eval_validation.json): the final evaluations, with their figures;
  TRAINING_CURVES_FILE; LOCK_FILE (.lock): held by the training process.

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

A resumed run (DIR holds a checkpoint) may change only config.RESUMABLE_KEYS, and
RELOCATABLE_KEYS when split.json proves the data the same (`check_resume_config`), and may not
ask for fewer steps than it reached (`check_num_steps`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import pathlib
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, BinaryIO

import ml_collections

from facenet_jax.config import RESUMABLE_KEYS, changed_keys, get_dotted, provenance, to_plain

CONFIG_FILE = "config.json"
SPLIT_FILE = "split.json"  # each split's identity names (data.write_split_record)
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
CHECKPOINT_DIR = "checkpoints"
EVAL_FILE = "eval.json"  # the test split's evaluation at the end of training
VALIDATION_EVAL_FILE = "eval_validation.json"  # the validation split's, with the run's threshold
TRAINING_CURVES_FILE = "training_curves.png"  # written after the last step
LOCK_FILE = ".lock"  # held by the training process (exclusive_workdir)
# The version of what a run folder holds: its files, their keys (config.json's config keys
# included) and the checkpoint tree. Bump it with any change to them; folders of another
# version are refused (check_layout) with the commit that reads them, never converted.
LAYOUT_VERSION = 2
# Config keys a resumed run may change when its data proves the same (names and image counts
# per identity as split.json records them): the same folder reached by another path.
RELOCATABLE_KEYS = ("data.root",)

# errno values by which a filesystem refuses flock itself (as opposed to "held by another").
FLOCK_REFUSED = frozenset({errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK, errno.EINVAL})
FALLBACK_SUFFIX = ".excl"  # the O_EXCL lock file is the flock file's name + this


class LockHeldError(RuntimeError):
    """Another process holds the lock; the message names it and what to do."""


def atomic_write_with(path: str | pathlib.Path,
                      write: Callable[[BinaryIO], object]) -> pathlib.Path:
    """Writes `path` by calling write(file) on a per-writer temporary file beside it, then a
    rename: readers, and a crash, see the old file or the whole new one; if `write` raises,
    the old file stays as it was."""
    path = pathlib.Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # the rename must not land before the data on a crash
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_bytes(path: str | pathlib.Path, payload: bytes) -> pathlib.Path:
    return atomic_write_with(path, lambda f: f.write(payload))


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
def blocking_lock(path: str | pathlib.Path) -> Iterator[None]:
    """Holds an exclusive flock on `path` for the `with` body, waiting for another holder to
    finish (e.g. a process building the cache entry this one would build too)."""
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


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


# ----------------------------------------------------------------------------------------------
# The training process's hold on its run folder.


def prepare_workdir(workdir: pathlib.Path, is_writer: bool) -> None:
    """Creates DIR and proves it writable before any long work (clear error otherwise); a no-op
    on processes other than the writer (process 0)."""
    if not is_writer:
        return
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe = workdir / ".write_test"
        probe.write_bytes(b"0" * 4096)
        probe.unlink()
    except OSError as error:
        raise OSError(f"workdir {workdir} is not writable ({error.strerror}); choose another "
                      "--workdir or free space/permissions there") from error


@contextlib.contextmanager
def exclusive_workdir(workdir: pathlib.Path, is_writer: bool) -> Iterator[None]:
    """Holds an exclusive lock on DIR/.lock while training (the writer only; flock, dropped by
    the kernel if the process dies; a DIR/.lock.excl file where the filesystem refuses flock,
    see exclusive_lock). Two runs in one DIR, e.g. a requeued job whose old copy still runs,
    would each delete the other's in-progress checkpoint as a torn save."""
    if not is_writer:
        yield
        return
    lock = workdir / LOCK_FILE
    try:
        with exclusive_lock(lock, what=f"training in {workdir}") as kind:
            if kind == "flock":
                logging.info("workdir lock: flock on %s", lock)
            else:  # say so: the lock then depends on the fallback's stale-file rule
                logging.warning("workdir lock: the filesystem refused flock; took the lock file "
                                "%s%s instead", lock, FALLBACK_SUFFIX)
            yield
    except LockHeldError as error:
        raise RuntimeError(f"{error}, or use another --workdir") from None


# ----------------------------------------------------------------------------------------------
# The config record and the resume checks.


def write_config(workdir: pathlib.Path, config: ml_collections.ConfigDict, *,
                 imported: dict[str, Any] | None = None,
                 init_from: dict[str, Any] | None = None) -> pathlib.Path:
    """DIR/config.json: {"config", "provenance"}, the provenance holding LAYOUT_VERSION beside
    the commit. `imported` (where imported weights came from) goes into the provenance as
    "imported", which marks a folder written by pretrained; `init_from` ({"path": absolute
    DIR, "step": N}, the run a fine-tune started from) as "init_from"."""
    record_provenance = {**provenance(), "layout_version": LAYOUT_VERSION}
    if imported is not None:
        record_provenance["imported"] = imported
    if init_from is not None:
        record_provenance["init_from"] = init_from
    return atomic_write_json(pathlib.Path(workdir) / CONFIG_FILE,
                             {"config": to_plain(config), "provenance": record_provenance})


def read_config_record(workdir: str | pathlib.Path) -> dict[str, Any] | None:
    """DIR/config.json as written ({"config", "provenance"}), or None when there is none; its
    layout is not checked (read_run_record checks it)."""
    path = pathlib.Path(workdir) / CONFIG_FILE
    if not path.exists():
        return None
    return json.loads(path.read_text())


def check_layout(record: Mapping[str, Any], workdir: str | pathlib.Path) -> None:
    """ValueError, in one line, unless DIR's config.json `record` was written with this code's
    LAYOUT_VERSION: it names the folder's version, the commit that wrote it (or, without one,
    the package version) and what to check out to read it."""
    recorded = record.get("provenance") or {}
    version = recorded.get("layout_version")
    if version == LAYOUT_VERSION:
        return
    commit = recorded.get("git_commit")
    package = (recorded.get("versions") or {}).get("facenet_jax")
    if commit:
        source, checkout = f"commit {commit}", f"`git checkout {commit}`"
    elif package:
        source, checkout = (f"facenet_jax {package} (no commit recorded)",
                            f"the facenet_jax {package} release")
    else:
        source, checkout = "unknown code (no commit or version recorded)", "the code that wrote it"
    shown = ("none (written before layout versions)" if version is None
             else f"{version}")
    raise ValueError(
        f"{workdir} is a run folder of layout version {shown}, written by {source}; this code "
        f"reads layout version {LAYOUT_VERSION} only: check out {checkout} to load it, or "
        "train a new run (another --workdir)")


def read_run_record(workdir: str | pathlib.Path) -> dict[str, Any] | None:
    """DIR/config.json (read_config_record) after check_layout; None when there is none. What
    every reader of a run folder (resume, evaluate, embed, init_from, crossval, sweep tables)
    goes through."""
    record = read_config_record(workdir)
    if record is not None:
        check_layout(record, workdir)
    return record


def load_run_config(workdir: str | pathlib.Path) -> ml_collections.ConfigDict:
    """The config DIR's run was recorded with (its layout checked: read_run_record).
    FileNotFoundError without one."""
    record = read_run_record(workdir)
    if record is None:
        raise FileNotFoundError(f"{pathlib.Path(workdir) / CONFIG_FILE} not found: is {workdir} "
                                "a facenet_jax run folder?")
    return ml_collections.ConfigDict(record["config"])


def check_resume_config(workdir: pathlib.Path, config: ml_collections.ConfigDict,
                        reached: int | None) -> dict[str, Any] | None:
    """A resumed run may only change RESUMABLE_KEYS, and RELOCATABLE_KEYS whose data the
    split record then proves the same (data.check_split_record); anything else is an error
    naming the keys and both values. DIR's layout is checked first (read_run_record).
    Returns DIR's config.json record when a checkpoint binds it, else None.

    Only a checkpoint binds the config (`reached`: DIR's newest checkpoint step, None without
    one): a run that stopped before its first save (bad data, a NaN at step 3) may be started
    again with a corrected config in the same DIR.
    """
    if reached is None:
        return None
    record = read_run_record(workdir)
    if record is None:
        return None
    saved, current = record["config"], to_plain(config)
    differing = [k for k in changed_keys(saved, current) if k not in RELOCATABLE_KEYS]
    if differing:
        details = "; ".join(
            f"{k}: {get_dotted(saved, k)!r} -> {get_dotted(current, k)!r}" for k in differing)
        raise ValueError(
            f"{workdir} holds a run with a different config ({details}). A resumed run may only "
            f"change {', '.join(RESUMABLE_KEYS)}, and {', '.join(RELOCATABLE_KEYS)} when it "
            "holds the same images. Use a new --workdir, or restore those keys.")
    return record


def check_num_steps(reached: int | None, num_steps: int) -> None:
    """A resumed run may not ask for fewer steps than its newest checkpoint (step `reached`)
    already holds."""
    if reached is not None and reached > num_steps:
        raise ValueError(
            f"config.num_steps={num_steps} is below the step {reached} this workdir already "
            f"reached; pass --config.num_steps >= {reached}")
