"""Where does a long run's host memory grow: Python objects or native code?

long_run.py sees anonymous RSS creep slowly between releases. This script runs the same tiny
training in-process with `tracemalloc` on, and at two steps after warm-up records both the
Python heap that tracemalloc sees and the process's anonymous RSS (/proc/self/status). Growth
that tracemalloc does not see is native (XLA, TensorStore, the allocator). It also lists the
source lines whose Python allocations grew most between the two snapshots.

    python benchmarks/heap_growth.py                  # 4000 steps, ~2 min on 2 CPU cores
    python benchmarks/heap_growth.py --num-steps 10000 --first 2000

Uses kill_resume.py's tiny config, with a checkpoint every 500 steps as long_run.py does.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import pathlib
import sys
import tempfile
import tracemalloc
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from kill_resume import REPO, TINY  # noqa: E402
from long_run import memory_mib  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from benchmarks.output_file import add_output_arguments, refuse_existing  # noqa: E402

TOP_SITES = 8


def tiny_overrides(num_steps: int) -> dict[str, Any]:
    """kill_resume.TINY's `--config.KEY=VALUE` flags as typed overrides, plus the run length."""
    overrides: dict[str, Any] = {}
    for flag in TINY:
        key, text = flag.removeprefix("--config.").split("=", 1)
        try:
            overrides[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            overrides[key] = text  # a bare word such as "constant"
    overrides.update({"num_steps": num_steps, "checkpoint_every": 500})
    return overrides


def growth_sites(before: tracemalloc.Snapshot, after: tracemalloc.Snapshot
                 ) -> list[dict[str, Any]]:
    """The source lines whose live Python allocations grew most, largest first."""
    ignore = [tracemalloc.Filter(False, tracemalloc.__file__), tracemalloc.Filter(False, __file__)]
    stats = after.filter_traces(ignore).compare_to(before.filter_traces(ignore), "lineno")
    return [{"site": str(stat.traceback[0]), "growth_kib": stat.size_diff / 1024,
             "new_blocks": stat.count_diff} for stat in stats[:TOP_SITES]]


def measure(num_steps: int, first: int, workdir: pathlib.Path) -> dict[str, Any]:
    from facenet_jax import config as cfg
    from facenet_jax import logs, train

    config = cfg.load_config(REPO / "experiments" / "default.py", tiny_overrides(num_steps))
    marks: dict[int, dict[str, Any]] = {}
    write = logs.MetricsWriter.write

    def write_and_mark(self: logs.MetricsWriter, step: int, values: dict[str, Any]) -> None:
        write(self, step, values)
        if step in (first, num_steps) and step not in marks:
            marks[step] = {"snapshot": tracemalloc.take_snapshot(),
                           "python_mib": tracemalloc.get_traced_memory()[0] / 2**20,
                           "anon_mib": memory_mib(os.getpid())["anon"]}
            print(f"step {step}: Python heap {marks[step]['python_mib']:.2f} MiB, anonymous "
                  f"RSS {marks[step]['anon_mib']:.1f} MiB", flush=True)

    logs.MetricsWriter.write = write_and_mark  # the logging hook is the one per-step callback
    tracemalloc.start()
    try:
        train.train_and_evaluate(config, workdir)
    finally:
        tracemalloc.stop()
        logs.MetricsWriter.write = write
    start, end = marks[first], marks[num_steps]
    per_1000 = 1000 / (num_steps - first)
    return {
        "num_steps": num_steps, "first_mark": first, "checkpoint_every": 500,
        "python_heap_mib": [start["python_mib"], end["python_mib"]],
        "anon_rss_mib": [start["anon_mib"], end["anon_mib"]],
        "python_growth_mib_per_1000_steps": (end["python_mib"] - start["python_mib"]) * per_1000,
        "anon_growth_mib_per_1000_steps": (end["anon_mib"] - start["anon_mib"]) * per_1000,
        "top_python_growth": growth_sites(start["snapshot"], end["snapshot"]),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-steps", type=int, default=4000)
    parser.add_argument("--first", type=int, default=1000, help="step of the first snapshot")
    add_output_arguments(parser, REPO / "benchmarks" / "results" / "heap_growth.json")
    args = parser.parse_args(argv)
    refuse_existing(parser, [args.output], args.overwrite)
    if not 0 < args.first < args.num_steps:
        parser.error("--first must lie between 0 and --num-steps")
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    with tempfile.TemporaryDirectory() as scratch:
        result = measure(args.num_steps, args.first, pathlib.Path(scratch) / "run")
    print(f"per 1000 steps: Python heap {result['python_growth_mib_per_1000_steps']:+.3f} MiB, "
          f"anonymous RSS {result['anon_growth_mib_per_1000_steps']:+.3f} MiB")
    for site in result["top_python_growth"]:
        print(f"  {site['growth_kib']:+8.1f} KiB  {site['new_blocks']:+6d} blocks  {site['site']}")
    output = pathlib.Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
