"""A long run of small steps: does host memory stay flat and the step time constant?

Runs the train CLI on a tiny config for thousands of steps (checkpoints, metrics and
TensorBoard logs as usual) and, from outside, samples the process's resident memory
(/proc/PID/status VmRSS) and the step it has logged. Step time comes from metrics.jsonl: each
row's images/s over its log window (windows that hold a checkpoint save include it). Reports
RSS after the first logged steps (compiled), after warm-up (first compiled steps and first checkpoint done), at the end of
training (before the final evaluation), the growth between the last two and the growth
per 1000 steps fitted over the whole post-warm-up run, and the median step time of the first
and the last 1000 steps.

    python benchmarks/long_run.py                     # 6000 steps, ~2-4 min on 2 CPU cores
    python benchmarks/long_run.py --num-steps 10000 --output /tmp/long_run.json

Uses kill_resume.py's tiny config and environment (2 host devices, persistent compile cache).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from kill_resume import REPO, logged_steps, train_command, train_env  # noqa: E402

BATCH = 8 * 2  # kill_resume.TINY: P = 8 identities × K = 2 images


def rss_mib(pid: int) -> float | None:
    """Resident set size of a live process in MiB (None once it has exited)."""
    try:
        for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def step_times(workdir: pathlib.Path) -> list[tuple[int, float]]:
    """(step, mean seconds per step over the log window ending there) from metrics.jsonl."""
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], BATCH / r["images_per_second"]) for r in rows
            if r.get("images_per_second")]


def sample(process: subprocess.Popen, workdir: pathlib.Path, num_steps: int,
           interval: float) -> list[dict[str, float]]:
    """(seconds, step logged, RSS MiB) every `interval` seconds until training ends."""
    samples, start = [], time.perf_counter()
    while process.poll() is None:
        rss = rss_mib(process.pid)
        step = max(logged_steps(workdir), default=0)
        if rss is not None:
            samples.append({"t": round(time.perf_counter() - start, 2), "step": step,
                            "rss_mib": round(rss, 1)})
        if step >= num_steps:  # training done; the final evaluation is not part of the loop
            break
        time.sleep(interval)
    return samples


def summarise(samples: list[dict[str, float]], times: list[tuple[int, float]],
              num_steps: int, warmup_steps: int, log_every: int) -> dict[str, object]:
    stepping = [s for s in samples if s["step"] >= 1]  # compiled, first steps logged
    training = [s for s in samples if s["step"] >= warmup_steps]
    steps = np.array([s["step"] for s in training], float)
    rss = np.array([s["rss_mib"] for s in training])
    slope = float(np.polyfit(steps, rss, 1)[0]) * 1000 if len(set(steps)) > 1 else None
    first = [t for step, t in times if step <= 1000 and step > log_every]  # skip compile
    last = [t for step, t in times if step > num_steps - 1000]
    return {
        "rss_mib_first_steps": stepping[0]["rss_mib"],
        "rss_mib_after_warmup": training[0]["rss_mib"],
        "rss_mib_end": training[-1]["rss_mib"],
        "rss_mib_peak_during_training": float(rss.max()),
        "rss_growth_mib_after_warmup": round(training[-1]["rss_mib"] - training[0]["rss_mib"],
                                             1),
        "rss_growth_mib_per_1000_steps_fit": None if slope is None else round(slope, 2),
        "step_ms_median_first_1000": round(1000 * statistics.median(first), 2),
        "step_ms_median_last_1000": round(1000 * statistics.median(last), 2),
        "step_time_ratio_last_to_first": round(statistics.median(last)
                                               / statistics.median(first), 3),
        # The fastest window is the least disturbed by other load on a shared machine.
        "step_ms_min_first_1000": round(1000 * min(first), 2),
        "step_ms_min_last_1000": round(1000 * min(last), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-steps", type=int, default=6000)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--checkpoint-every", type=int, default=500)
    parser.add_argument("--warmup-steps", type=int, default=1000,
                        help="RSS growth is measured from here (after the first checkpoint)")
    parser.add_argument("--interval", type=float, default=0.5)
    parser.add_argument("--output", default=str(REPO / "benchmarks" / "results" /
                                                 "long_run.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="long_run_") as scratch:
        scratch = pathlib.Path(scratch)
        workdir = scratch / "run"
        command = train_command(workdir, args.num_steps, f"--config.log_every={args.log_every}",
                                f"--config.checkpoint_every={args.checkpoint_every}")
        started = time.perf_counter()
        with (scratch / "train.log").open("w") as log:
            process = subprocess.Popen(command, cwd=REPO, env=train_env(scratch / "cache"),
                                       stdout=log, stderr=subprocess.STDOUT)
            samples = sample(process, workdir, args.num_steps, args.interval)
            if process.wait() != 0:
                raise RuntimeError(f"training failed:\n{(scratch / 'train.log').read_text()}")
        seconds = time.perf_counter() - started
        times = step_times(workdir)
    summary = summarise(samples, times, args.num_steps, args.warmup_steps, args.log_every)
    summary.update({
        "num_steps": args.num_steps, "log_every": args.log_every,
        "checkpoint_every": args.checkpoint_every, "warmup_steps": args.warmup_steps,
        "batch": BATCH, "wall_seconds": round(seconds, 1),
        "machine": "shared 2-core CPU, 2 XLA host devices",
        "command": "python benchmarks/long_run.py " + " ".join(sys.argv[1:]),
        "step_ms_per_window": [[step, round(1000 * t, 2)] for step, t in times],
        "rss_samples": samples,
    })
    output = pathlib.Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"{args.num_steps} steps in {seconds:.0f} s: RSS {summary['rss_mib_first_steps']:.0f} "
          f"MiB after the first steps, {summary['rss_mib_after_warmup']:.0f} after warm-up (step "
          f"{args.warmup_steps}), {summary['rss_mib_end']:.0f} at the end (growth "
          f"{summary['rss_growth_mib_after_warmup']:+.1f} MiB, fit "
          f"{summary['rss_growth_mib_per_1000_steps_fit']:+.2f} MiB/1000 steps); step time "
          f"median {summary['step_ms_median_first_1000']:.1f} ms (first 1000) vs "
          f"{summary['step_ms_median_last_1000']:.1f} ms (last 1000), fastest window "
          f"{summary['step_ms_min_first_1000']:.1f} vs {summary['step_ms_min_last_1000']:.1f} "
          f"ms -> {output}")


if __name__ == "__main__":
    main()
