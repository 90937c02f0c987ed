"""SIGKILL the train CLI at random moments, many times in a row, and check nothing was lost.

One uninterrupted run of a tiny config is the reference. A second run in another folder is
killed with SIGKILL again and again, each time at a moment drawn (seeded) from:
  mid_save    as soon as a checkpoint save has started (orbax's `STEP.orbax-checkpoint-tmp`
              folder appears), so the kill lands while the checkpoint is being written;
  after_save  a uniform random delay after this process completed a checkpoint;
  in_loop     a uniform random delay after the loop has logged a new step (saves take most of
              the loop's time with checkpoint_every=2, so many of these land mid-save too);
  from_start  a uniform random delay after the process starts (imports, restore, compile, ...),
and restarted with the same command. After the last kill it runs to completion. Recorded for
each kill: the moment, the delay, the newest complete checkpoint, whether it cut a checkpoint
write short (the killed process's log shows the write started and not finished, and the step's
folder is not complete), the temporary folders present, and the step the next start resumed
from (parsed from its log). Checked:
every restart resumes from the newest complete checkpoint, no torn save survives a restart,
metrics.jsonl holds every step exactly once, and the final checkpoint equals the reference's
bit for bit (every array: parameters, BatchNorm statistics, optimiser state, step, key).

    python benchmarks/kill_resume.py                       # 24 kills, ~6 min on 2 CPU cores
    python benchmarks/kill_resume.py --kills 40 --seed 1 --output /tmp/kill_resume.json

All processes use a JAX persistent compilation cache (as a real preemptible job would), so a
restart costs seconds. tests/test_faults_kill.py runs a few kills through the same functions.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.output_file import add_output_arguments, refuse_existing  # noqa: E402

TORN = ".orbax-checkpoint-tmp"
MOMENTS = ("mid_save", "after_save", "in_loop", "from_start")
# A tiny run whose loop is dominated by checkpoint writes, so random kills often land mid-save.
TINY = (
    "--config.log_every=1", "--config.eval_every=100000", "--config.checkpoint_every=2",
    "--config.data.image_size=16", "--config.data.synthetic.num_identities=40",
    "--config.data.synthetic.images_per_identity=6", "--config.batch.identities=8",
    "--config.batch.images_per_identity=2", "--config.data.pairs.pairs_per_fold=20",
    "--config.eval.batch_size=64", "--config.model.embedding_dim=16",
    "--config.optimizer.schedule=constant",
)


@dataclasses.dataclass
class Kill:
    """One SIGKILL and what the disk and the next start looked like around it."""

    moment: str
    delay_s: float
    logged_step: int               # newest step in metrics.jsonl when killed
    complete_before: int | None    # newest complete checkpoint when killed
    mid_save: int | None           # the step whose checkpoint write the kill cut off
    torn_left: list[str]           # temporary (torn) save folders present after the kill
    # The step the next start restored (0: it started afresh), None if that start was itself
    # killed before it got that far.
    resumed_from: int | None = None


def train_env(cache_dir: str | pathlib.Path, devices: int = 2) -> dict[str, str]:
    """The environment of every run: CPU devices and a shared persistent compilation cache
    (the caller's other XLA flags kept)."""
    from facenet_jax.parallel import host_device_flags

    env = dict(os.environ)
    env.update({
        "XLA_FLAGS": host_device_flags(env.get("XLA_FLAGS", ""), devices),
        "JAX_PLATFORMS": "cpu",
        "JAX_COMPILATION_CACHE_DIR": str(cache_dir),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    })
    return env


def train_command(workdir: pathlib.Path, num_steps: int, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "facenet_jax.train", "--config",
            str(REPO / "experiments" / "default.py"), "--workdir", str(workdir), *TINY,
            f"--config.num_steps={num_steps}", *overrides]


def complete_steps(workdir: pathlib.Path) -> list[int]:
    folder = workdir / "checkpoints"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if (
        folder.is_dir()) else []


def torn_saves(workdir: pathlib.Path) -> list[str]:
    folder = workdir / "checkpoints"
    return sorted(p.name for p in folder.iterdir() if TORN in p.name) if folder.is_dir() else []


def logged_steps(workdir: pathlib.Path) -> list[int]:
    """Steps of the training rows in metrics.jsonl (a torn last line is ignored)."""
    path = workdir / "metrics.jsonl"
    steps = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "loss" in row:
            steps.append(row["step"])
    return steps


def restored_step(log_text: str) -> int | None:
    """From one start's log: the step it resumed from, 0 if it trained from scratch, None if it
    was killed before either showed."""
    found = re.findall(r"resumed from step (\d+)", log_text)
    if found:
        return int(found[-1])
    return 0 if re.search(r"step \d+/\d+", log_text) else None


def interrupted_save(log_text: str) -> int | None:
    """The step whose checkpoint write a log shows started and not finished (checkpoints.save
    logs both), else None."""
    started = re.findall(r"writing the checkpoint of step (\d+)", log_text)
    if started and f"checkpoint of step {started[-1]} complete" not in log_text:
        return int(started[-1])
    return None


def _wait_for(condition, process: subprocess.Popen, timeout: float, poll: float) -> bool:
    """True once condition() holds; False if the process exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if process.poll() is not None:
            return False
        time.sleep(poll)
    raise TimeoutError(f"no progress within {timeout:.0f} s (is the machine overloaded?)")


def kill_at(process: subprocess.Popen, workdir: pathlib.Path, moment: str, rng: random.Random,
            *, max_delay: float, timeout: float) -> float | None:
    """SIGKILLs `process` at `moment`; returns the random delay used, None if it ended first."""
    delay = 0.0
    if moment == "mid_save":
        # A temporary folder made by this process: one left by the previous kill counts only
        # once it has been cleaned up (the new save may reuse its name).
        leftover = set(torn_saves(workdir))

        def saving() -> bool:
            current = set(torn_saves(workdir))
            leftover.intersection_update(current)
            return bool(current - leftover)
        started = _wait_for(saving, process, timeout, 0.001)
    elif moment == "after_save":
        newest = max(complete_steps(workdir), default=0)
        started = _wait_for(lambda: max(complete_steps(workdir), default=0) > newest,
                            process, timeout, 0.01)
        delay = rng.uniform(0.0, max_delay)
    elif moment == "in_loop":  # a step logged by this process (rows past `start` are stale
        start = max(complete_steps(workdir), default=0)  # until it truncates them)
        stale = logged_steps(workdir)

        def stepping() -> bool:
            steps = logged_steps(workdir)
            return steps != stale and max(steps, default=0) > start
        started = _wait_for(stepping, process, timeout, 0.01)
        delay = rng.uniform(0.0, max_delay)
    elif moment == "from_start":
        started, delay = True, rng.uniform(0.0, max_delay)
    else:
        raise ValueError(f"unknown kill moment {moment!r}; valid: {', '.join(MOMENTS)}")
    if not started:
        return None
    time.sleep(delay)
    if process.poll() is not None:
        return None
    process.send_signal(signal.SIGKILL)
    process.wait()
    return delay


def run_with_kills(workdir: pathlib.Path, moments: Sequence[str], *, num_steps: int,
                   env: dict[str, str], seed: int, logs: pathlib.Path,
                   loop_max_delay: float = 1.0, from_start_max_delay: float = 12.0,
                   timeout: float = 300.0) -> dict[str, Any]:
    """Kills the run once per moment (restarting each time), then lets it finish.

    Returns {"kills": [Kill...], "final_returncode", "final_resumed_from", "restarts"}. A
    moment at which the run had already finished is skipped (not counted as a kill).
    """
    rng = random.Random(seed)
    logs.mkdir(parents=True, exist_ok=True)
    kills: list[Kill] = []
    command = train_command(workdir, num_steps)
    for index, moment in enumerate(moments):
        log_path = logs / f"run_{index:03d}.log"
        with log_path.open("w") as log:
            process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log,
                                       stderr=subprocess.STDOUT)
        max_delay = from_start_max_delay if moment == "from_start" else loop_max_delay
        delay = kill_at(process, workdir, moment, rng, max_delay=max_delay, timeout=timeout)
        if kills:
            kills[-1].resumed_from = restored_step(log_path.read_text())
        if delay is None:  # it finished (or failed) on its own: stop killing
            if process.wait() != 0:
                raise RuntimeError(f"run {index} failed; see {log_path}")
            return {"kills": kills, "final_returncode": 0, "restarts": index,
                    "final_resumed_from": restored_step(log_path.read_text())}
        complete = complete_steps(workdir)
        cut = interrupted_save(log_path.read_text())
        kills.append(Kill(moment=moment, delay_s=round(delay, 4),
                          mid_save=cut if cut not in complete else None,
                          logged_step=max(logged_steps(workdir), default=0),
                          complete_before=complete[-1] if complete else None,
                          torn_left=torn_saves(workdir)))
    log_path = logs / "final.log"
    with log_path.open("w") as log:
        returncode = subprocess.run(command, cwd=REPO, env=env, stdout=log,
                                    stderr=subprocess.STDOUT, timeout=timeout).returncode
    final_resumed = restored_step(log_path.read_text())
    if kills:
        kills[-1].resumed_from = final_resumed
    return {"kills": kills, "final_returncode": returncode, "restarts": len(kills),
            "final_resumed_from": final_resumed}


def differing_arrays(workdir: pathlib.Path, reference: pathlib.Path, step: int
                     ) -> tuple[int, list[str]]:
    """(number of arrays, paths of those not bit-identical) between two runs' step checkpoint."""
    import numpy as np

    from facenet_jax import checkpoints

    ours = checkpoints.read_arrays(workdir, step)
    theirs = checkpoints.read_arrays(reference, step)
    return len(ours), sorted(k for k in ours.keys() | theirs.keys()
                             if k not in ours or k not in theirs
                             or not np.array_equal(ours[k], theirs[k]))


def check(result: dict[str, Any], workdir: pathlib.Path, reference: pathlib.Path,
          num_steps: int) -> dict[str, Any]:
    """What held: resumes from the newest complete checkpoint, no torn save left, every step
    logged once, final arrays equal to the reference's bit for bit."""
    kills = result["kills"]
    compared, differing = differing_arrays(workdir, reference, num_steps)
    return {
        "kills": len(kills),
        "kills_by_moment": {m: sum(k.moment == m for k in kills) for m in MOMENTS},
        "kills_mid_save": sum(k.mid_save is not None for k in kills),
        "kills_before_first_checkpoint": sum(k.complete_before is None for k in kills),
        "resumes": sum(bool(k.resumed_from) for k in kills),
        "restarts_killed_before_restoring": sum(k.resumed_from is None for k in kills),
        "resumed_from_newest_complete": all(k.resumed_from == (k.complete_before or 0)
                                            for k in kills if k.resumed_from is not None),
        "torn_saves_left_at_end": torn_saves(workdir),
        "every_step_logged_once": logged_steps(workdir) == list(range(1, num_steps + 1)),
        "final_returncode": result["final_returncode"],
        "arrays_compared": compared,
        "arrays_differing": differing,
        "final_equal_to_uninterrupted": not differing,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kills", type=int, default=24)
    parser.add_argument("--num-steps", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    add_output_arguments(parser, REPO / "benchmarks" / "results" / "kill_resume.json")
    args = parser.parse_args(argv)
    refuse_existing(parser, [args.output], args.overwrite)
    rng = random.Random(args.seed)
    moments = rng.choices(MOMENTS, weights=(0.3, 0.2, 0.3, 0.2), k=args.kills)
    with tempfile.TemporaryDirectory(prefix="kill_resume_") as scratch:
        scratch = pathlib.Path(scratch)
        env = train_env(scratch / "jax_cache")
        started = time.perf_counter()
        reference_log = scratch / "reference.log"
        with reference_log.open("w") as log:
            subprocess.run(train_command(scratch / "reference", args.num_steps), cwd=REPO,
                           env=env, stdout=log, stderr=subprocess.STDOUT, check=True)
        reference_seconds = time.perf_counter() - started
        started = time.perf_counter()
        result = run_with_kills(scratch / "killed", moments, num_steps=args.num_steps,
                                env=env, seed=args.seed + 1, logs=scratch / "logs")
        killed_seconds = time.perf_counter() - started
        summary = check(result, scratch / "killed", scratch / "reference", args.num_steps)
    summary.update({
        "num_steps": args.num_steps, "checkpoint_every": 2, "seed": args.seed,
        "moments_drawn": len(moments),
        "reference_seconds": round(reference_seconds, 1),
        "killed_run_seconds_total": round(killed_seconds, 1),
        "per_kill": [dataclasses.asdict(k) for k in result["kills"]],
        "machine": "shared 2-core CPU, 2 XLA host devices",
        "command": "python benchmarks/kill_resume.py " + " ".join(sys.argv[1:]),
    })
    output = pathlib.Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"{summary['kills']} SIGKILLs ({summary['kills_mid_save']} mid-save, "
          f"{summary['kills_before_first_checkpoint']} before the first checkpoint), "
          f"{summary['resumes']} resumes, all from the newest complete checkpoint: "
          f"{summary['resumed_from_newest_complete']}; torn saves left: "
          f"{summary['torn_saves_left_at_end'] or 'none'}; every step logged once: "
          f"{summary['every_step_logged_once']}; final state equal to the uninterrupted run "
          f"({summary['arrays_compared']} arrays, bit for bit): "
          f"{summary['final_equal_to_uninterrupted']}; {killed_seconds:.0f} s "
          f"(uninterrupted: {reference_seconds:.0f} s) -> {output}")
    if not (summary["final_equal_to_uninterrupted"] and summary["resumed_from_newest_complete"]
            and summary["every_step_logged_once"] and not summary["torn_saves_left_at_end"]):
        sys.exit(1)


if __name__ == "__main__":
    main()
