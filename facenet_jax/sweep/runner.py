"""Running cells: one train process per run, its output in the cell's log, its outcome recorded.

Each run is `python -m facenet_jax.train --config BASE --workdir DIR/CELL --config.K=V ...` in a
subprocess. A subprocess per run costs a few seconds of start-up against minutes of training and
buys: a crash (or an out-of-memory kill) ends one run, not the sweep; each run's compiled
programs and datasets are freed; and the command run is exactly the one `--print_commands`
prints, with the train CLI's own parsing and type checks.

Each attempt's stdout and stderr stream into DIR/CELL/train.log as it runs, after a line naming
the attempt and its start time (earlier attempts' output is kept). A run that crashed or
diverged is recorded as such in DIR/CELL/sweep_status.json; one whose train process exited 0
without eval.json (the train CLI does so after saving a checkpoint on SIGTERM) as "preempted".

With `--parallel N` several runs share one machine, each on its own `Slot`: on a GPU host a
share of the visible GPUs (CUDA_VISIBLE_DEVICES), on a CPU host a share of the cores (CPU
affinity, which XLA's thread pools size themselves by).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from facenet_jax.sweep.records import EVAL_FILE, LOG_FILE, STATUS_FILE, write_json
from facenet_jax.sweep.spec import REPO_ROOT

ATTEMPT_MARK = "===== sweep attempt"  # opens each attempt's output in train.log
# The train CLI's refusal when another process holds the run folder's lock (runfiles.exclusive_workdir).
BUSY = re.compile(r"another process \(.*\) is training in ")
_OUTPUT_TAIL = 64 * 1024  # bytes of an attempt's output read back to diagnose it


# ----------------------------------------------------------------------------------------------
# Slots: what one of several concurrent runs may use (pure, but for reading the host).


@dataclasses.dataclass(frozen=True)
class Slot:
    """One concurrent run's share of the host: extra environment and CPU cores (None: all)."""

    label: str
    env: Mapping[str, str] = dataclasses.field(default_factory=dict)
    cores: tuple[int, ...] | None = None


def device_slots(parallel: int, *, gpus: Sequence[str] | None, cores: Sequence[int]
                 ) -> list[Slot]:
    """`parallel` slots: with `gpus` (device ids), each slot gets len(gpus) // parallel of them
    as CUDA_VISIBLE_DEVICES (the same count each, so runs stay comparable); without, each gets
    a contiguous share of `cores` (the first len(cores) % parallel one more core).

    ValueError when there are fewer accelerators (or cores) than slots.
    """
    if parallel < 1:
        raise ValueError(f"--parallel must be at least 1, got {parallel}")
    if gpus:
        if parallel > len(gpus):
            raise ValueError(f"--parallel {parallel} needs one GPU per run, but this host shows "
                             f"{len(gpus)} ({','.join(gpus)}); use --parallel {len(gpus)} or "
                             "fewer")
        size = len(gpus) // parallel
        groups = [list(gpus[i * size:(i + 1) * size]) for i in range(parallel)]
        return [Slot(label=f"GPU {','.join(g)}", env={"CUDA_VISIBLE_DEVICES": ",".join(g)})
                for g in groups]
    cores = sorted(cores)
    if parallel > len(cores):
        raise ValueError(f"--parallel {parallel} needs a CPU core per run, but this process may "
                         f"use {len(cores)}; use --parallel {len(cores)} or fewer")
    size, extra = divmod(len(cores), parallel)
    slots, start = [], 0
    for i in range(parallel):
        share = tuple(cores[start:start + size + (i < extra)])
        start += len(share)
        slots.append(Slot(label=f"cores {_ranges(share)}", cores=share))
    return slots


def visible_gpus(environ: Mapping[str, str],
                 query: Callable[[], str | None] | None = None) -> list[str] | None:
    """The GPU ids runs can be given, or None for a CPU host. CUDA_VISIBLE_DEVICES when set;
    else `query()` (default: nvidia-smi's list of GPU indices; None when it is absent). A
    JAX_PLATFORMS without cuda/gpu means the runs use the CPU whatever is installed."""
    platforms = environ.get("JAX_PLATFORMS")
    if platforms and not {"cuda", "gpu"} & set(platforms.split(",")):
        return None
    if "CUDA_VISIBLE_DEVICES" in environ:
        ids = [d.strip() for d in environ["CUDA_VISIBLE_DEVICES"].split(",")]
        ids = [d for d in ids if d and d != "-1"]
        return ids or None
    listed = (query or _nvidia_smi_indices)()
    ids = [line.strip() for line in (listed or "").splitlines() if line.strip()]
    return ids or None


def _nvidia_smi_indices() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None


def host_slots(parallel: int, environ: Mapping[str, str]) -> list[Slot]:
    """device_slots for this host (its visible GPUs, else the cores this process may use)."""
    cores = (sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
             else list(range(os.cpu_count() or 1)))
    return device_slots(parallel, gpus=visible_gpus(environ), cores=cores)


def _ranges(cores: Sequence[int]) -> str:
    """(0, 1, 2, 5) → "0-2,5"."""
    parts, start = [], None
    for i, core in enumerate(cores):
        if start is None:
            start = core
        if i + 1 == len(cores) or cores[i + 1] != core + 1:
            parts.append(str(start) if start == core else f"{start}-{core}")
            start = None
    return ",".join(parts)


# ----------------------------------------------------------------------------------------------
# Processes.


class CellRunner:
    """Runs cell processes; inside `with`, SIGTERM to the sweep is passed on to every running
    cell, whose train CLI saves a checkpoint and exits (recorded as preempted), and
    `stop_requested` tells the sweep not to start another cell. Without this the cells would
    run on as orphans of a preempted sweep. The handler is installed from the main thread
    only (where Python delivers signals)."""

    def __init__(self) -> None:
        self.stop_requested = False
        self._children: list[subprocess.Popen] = []
        self._previous: Any = None

    def __enter__(self) -> "CellRunner":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._forward)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def _forward(self, signum: int, frame: Any) -> None:
        self.stop_requested = True
        for child in list(self._children):
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)

    def start(self, argv: Sequence[str], cores: Sequence[int] | None = None,
              **popen_kwargs: Any) -> subprocess.Popen:
        """Starts argv (pinned to `cores` when given); `wait`/`poll` collect it."""
        if cores is not None and hasattr(os, "sched_setaffinity"):
            # Set in the child before exec, so every thread XLA starts inherits it. (The sweep
            # process starts no threads, which makes preexec_fn safe here.)
            popen_kwargs["preexec_fn"] = lambda: os.sched_setaffinity(0, cores)
        child = subprocess.Popen(argv, **popen_kwargs)
        self._children.append(child)
        if self.stop_requested:  # a SIGTERM that arrived while it was starting
            child.send_signal(signal.SIGTERM)
        return child

    def poll(self, child: subprocess.Popen) -> int | None:
        """The child's return code once it has ended (then forgotten), else None."""
        returncode = child.poll()
        if returncode is not None:
            self._children.remove(child)
        return returncode

    def wait(self, child: subprocess.Popen) -> int:
        try:
            return child.wait()
        finally:
            self._children.remove(child)

    def run(self, argv: Sequence[str], **popen_kwargs: Any) -> int:
        """Runs argv to completion; its return code."""
        return self.wait(self.start(argv, **popen_kwargs))


@dataclasses.dataclass
class StartedCell:
    """A cell's train process, started by start_cell, to be finished by finish_cell."""

    cell_dir: pathlib.Path
    process: subprocess.Popen
    output_start: int  # where this attempt's output begins in the log
    start: float  # time.perf_counter() at the start


def start_cell(command: Sequence[str], cell_dir: pathlib.Path, env: Mapping[str, str] | None,
               runner: CellRunner, slot: Slot | None = None) -> StartedCell:
    """Starts one train command, its stdout and stderr appended to DIR/CELL/train.log while it
    runs, after an attempt_header (with the slot, if any)."""
    cell_dir.mkdir(parents=True, exist_ok=True)
    log_path = cell_dir / LOG_FILE
    earlier = log_path.read_text(errors="replace") if log_path.exists() else ""
    argv = [sys.executable, *command[1:]]
    env = {**(env or os.environ), **(slot.env if slot else {})}
    start = time.perf_counter()
    # Straight into the file, not through a pipe: `tail -f` follows the cell, and a killed
    # sweep still leaves the log. Appending keeps an earlier (failed) attempt's log.
    with log_path.open("ab") as log:
        log.write(attempt_header(attempts_logged(earlier) + 1,
                                 time.strftime("%Y-%m-%d %H:%M:%S %z"), command,
                                 slot.label if slot else None).encode())
        log.flush()
        output_start = log.tell()
        process = runner.start(argv, cores=slot.cores if slot else None, cwd=REPO_ROOT,
                               env=env, stdout=log, stderr=subprocess.STDOUT)
    return StartedCell(cell_dir, process, output_start, start)


def finish_cell(started: StartedCell, returncode: int) -> dict[str, Any]:
    """Diagnoses an ended attempt; returns and writes its status record: {"status", "error",
    "wall_s", "returncode"}. A "busy" attempt (another process is training this run) writes
    nothing: the status is that other process's to write when it ends."""
    wall = time.perf_counter() - started.start
    status, error = cell_outcome(returncode, (started.cell_dir / EVAL_FILE).exists(),
                                 _read_output(started.cell_dir / LOG_FILE, started.output_start))
    record = {"status": status, "error": error, "wall_s": wall, "returncode": returncode}
    if status != "busy":
        write_json(started.cell_dir / STATUS_FILE, record)
    return record


def run_cell(command: Sequence[str], cell_dir: pathlib.Path, env: Mapping[str, str] | None,
             runner: CellRunner | None = None, slot: Slot | None = None) -> dict[str, Any]:
    """Runs one train command to its end (start_cell, then finish_cell); its status record.
    `runner` passes a sweep's SIGTERM on to the cell."""
    runner = runner or CellRunner()
    started = start_cell(command, cell_dir, env, runner, slot)
    return finish_cell(started, runner.wait(started.process))


def _read_output(path: pathlib.Path, start: int) -> str:
    """This attempt's output in the log (from byte `start`), at most its last _OUTPUT_TAIL
    bytes: failures are diagnosed from the end."""
    with path.open("rb") as f:
        f.seek(max(start, path.stat().st_size - _OUTPUT_TAIL))
        return f.read().decode(errors="replace")


# ----------------------------------------------------------------------------------------------
# Outcomes (pure).


def diagnose_failure(returncode: int, stderr: str) -> tuple[str, str]:
    """(status, last line) of a failed train process: "diverged" for a non-finite loss,
    "crashed" otherwise (signals included)."""
    last = _last_line(stderr) or f"exit status {returncode} with no error output"
    if returncode < 0:
        last = f"killed by signal {-returncode}; {last}"
    status = "diverged" if "NonFiniteLossError" in stderr else "crashed"
    return status, last


def cell_outcome(returncode: int, finished: bool, output: str) -> tuple[str, str | None]:
    """(status, error) of one attempt at a cell from its exit status, whether eval.json
    exists, and its output: "ok"; "preempted" for exit 0 without eval.json (the train CLI's
    exit after saving a checkpoint on SIGTERM: a re-run resumes it); "busy" when the train CLI
    found another process training in the run's folder (e.g. the old copy of a requeued array
    task; not a failure, so a later sweep run tries again); else diagnose_failure."""
    if returncode == 0 and finished:
        return "ok", None
    busy = BUSY.search(output)
    if returncode != 0 and busy:
        return "busy", _last_line(output)
    if returncode == 0:
        last = _last_line(output)
        return "preempted", ("exited 0 without writing eval.json; the next sweep run resumes it"
                             + (f" (last output: {last})" if last else ""))
    return diagnose_failure(returncode, output)


def _last_line(text: str) -> str | None:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else None


def attempt_header(attempt: int, started: str, command: Sequence[str],
                   slot: str | None = None) -> str:
    """The line that opens one attempt's output in a cell's train.log."""
    where = f" on {slot}" if slot else ""
    return f"{ATTEMPT_MARK} {attempt}, started {started}{where}: {shlex.join(command)} =====\n"


def attempts_logged(log_text: str) -> int:
    """How many attempts a cell's train.log holds (those logged with an attempt_header)."""
    return sum(line.startswith(ATTEMPT_MARK) for line in log_text.splitlines())
