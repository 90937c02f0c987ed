"""A long run of small steps: does host memory stay flat and the step time constant?

Runs the train CLI on a tiny config for thousands of steps (checkpoints, metrics and
TensorBoard logs as usual) and, from outside, samples the process's resident memory
(/proc/PID/status: RssAnon, the heap and other anonymous pages where a leak shows, and VmRSS)
and the step it has logged. Step time comes from metrics.jsonl: each row's images/s over its
log window (checkpoint saves and evaluations excluded, as in every run's metrics). Reports
memory after the first logged steps (compiled), after warm-up (first checkpoints done), at the
end of training (before the final evaluation), the growth between the last two, the growth per
1000 steps fitted over the whole post-warm-up run, the median per 1000 steps, and the median and
fastest step time of the first and the last 1000 steps.

    python benchmarks/long_run.py                     # 20000 steps, ~4 min on 2 CPU cores
    python benchmarks/long_run.py --num-steps 50000 --output /tmp/long_run.json

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

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from benchmarks.output_file import add_output_arguments, refuse_existing  # noqa: E402

BATCH = 8 * 2  # kill_resume.TINY: P = 8 identities × K = 2 images


def memory_mib(pid: int) -> dict[str, float] | None:
    """A live process's resident memory in MiB: "rss" (VmRSS: everything resident) and "anon"
    (RssAnon: heap and other anonymous pages, where a leak grows; RSS also holds file-backed
    pages such as shared libraries, which the kernel drops and reloads under memory pressure
    from other processes). None once the process has exited."""
    fields = {"VmRSS:": "rss", "RssAnon:": "anon"}
    try:
        lines = pathlib.Path(f"/proc/{pid}/status").read_text().splitlines()
    except (FileNotFoundError, ProcessLookupError):
        return None
    found = {fields[line.split()[0]]: int(line.split()[1]) / 1024 for line in lines
             if line.split() and line.split()[0] in fields}
    return found if len(found) == len(fields) else None


def step_times(workdir: pathlib.Path) -> list[tuple[int, float]]:
    """(step, mean seconds per step over the log window ending there) from metrics.jsonl."""
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], BATCH / r["images_per_second"]) for r in rows
            if r.get("images_per_second")]


def sample(process: subprocess.Popen, workdir: pathlib.Path, num_steps: int,
           interval: float) -> list[dict[str, float]]:
    """{t seconds, step logged, rss and anon MiB} every `interval` s until training ends."""
    samples, start = [], time.perf_counter()
    while process.poll() is None:
        memory = memory_mib(process.pid)
        step = max(logged_steps(workdir), default=0)
        if memory is not None:
            samples.append({"t": round(time.perf_counter() - start, 2), "step": step,
                            **{k: round(v, 1) for k, v in memory.items()}})
        if step >= num_steps:  # training done; the final evaluation is not part of the loop
            break
        time.sleep(interval)
    return samples


def memory_summary(samples: list[dict[str, float]], key: str, warmup_steps: int
                   ) -> dict[str, float | None]:
    """`key` memory after the first steps, after warm-up, at the end; growth and fitted slope
    (MiB per 1000 steps, least squares over the post-warm-up samples)."""
    stepping = [s for s in samples if s["step"] >= 1]  # compiled, first steps logged
    training = [s for s in samples if s["step"] >= warmup_steps]
    steps = np.array([s["step"] for s in training], float)
    values = np.array([s[key] for s in training])
    slope = float(np.polyfit(steps, values, 1)[0]) * 1000 if len(set(steps)) > 1 else None
    return {
        f"{key}_mib_first_steps": stepping[0][key],
        f"{key}_mib_after_warmup": training[0][key],
        f"{key}_mib_end": training[-1][key],
        f"{key}_mib_peak_after_warmup": float(values.max()),
        # The bound the issue asks about: how far memory ever rose above its warmed-up level.
        f"{key}_mib_peak_above_warmup": round(float(values.max()) - training[0][key], 1),
        f"{key}_growth_mib_after_warmup": round(training[-1][key] - training[0][key], 1),
        f"{key}_growth_mib_per_1000_steps_fit": None if slope is None else round(slope, 3),
    }


def per_thousand(pairs: list[tuple[int, float]]) -> list[list[float]]:
    """(step, value) pairs → [[k, median value over steps (k-1)*1000 < step <= k*1000], ...]."""
    buckets: dict[int, list[float]] = {}
    for step, value in pairs:
        if step >= 1:
            buckets.setdefault(-(-int(step) // 1000), []).append(value)
    return [[k, round(statistics.median(v), 2)] for k, v in sorted(buckets.items())]


def summarise(samples: list[dict[str, float]], times: list[tuple[int, float]],
              num_steps: int, warmup_steps: int, log_every: int) -> dict[str, object]:
    first = [t for step, t in times if step <= 1000 and step > log_every]  # skip compile
    last = [t for step, t in times if step > num_steps - 1000]
    return {
        **memory_summary(samples, "anon", warmup_steps),
        **memory_summary(samples, "rss", warmup_steps),
        "anon_mib_median_per_1000_steps": per_thousand([(s["step"], s["anon"])
                                                        for s in samples]),
        "step_ms_median_per_1000_steps": per_thousand([(step, 1000 * t) for step, t in times
                                                       if step > log_every]),
        "step_ms_median_first_1000": round(1000 * statistics.median(first), 2),
        "step_ms_median_last_1000": round(1000 * statistics.median(last), 2),
        "step_time_ratio_last_to_first": round(statistics.median(last)
                                               / statistics.median(first), 3),
        # The fastest window is the least disturbed by other load on a shared machine.
        "step_ms_min_first_1000": round(1000 * min(first), 2),
        "step_ms_min_last_1000": round(1000 * min(last), 2),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-steps", type=int, default=20000)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--checkpoint-every", type=int, default=500)
    parser.add_argument("--warmup-steps", type=int, default=1000,
                        help="RSS growth is measured from here (after the first checkpoint)")
    parser.add_argument("--interval", type=float, default=0.5)
    add_output_arguments(parser, REPO / "benchmarks" / "results" / "long_run.json")
    args = parser.parse_args(argv)
    refuse_existing(parser, [args.output], args.overwrite)
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
    print(f"{args.num_steps} steps in {seconds:.0f} s: anonymous RSS "
          f"{summary['anon_mib_first_steps']:.0f} MiB after the first steps, "
          f"{summary['anon_mib_after_warmup']:.0f} after warm-up (step {args.warmup_steps}), "
          f"{summary['anon_mib_end']:.0f} at the end (end - warm-up "
          f"{summary['anon_growth_mib_after_warmup']:+.1f} MiB, highest "
          f"{summary['anon_mib_peak_above_warmup']:+.1f} MiB above warm-up; total RSS "
          f"{summary['rss_mib_after_warmup']:.0f} -> {summary['rss_mib_end']:.0f}); step time "
          f"median {summary['step_ms_median_first_1000']:.1f} ms (first 1000) vs "
          f"{summary['step_ms_median_last_1000']:.1f} ms (last 1000), fastest window "
          f"{summary['step_ms_min_first_1000']:.1f} vs {summary['step_ms_min_last_1000']:.1f} "
          f"ms -> {output}")


if __name__ == "__main__":
    main()
