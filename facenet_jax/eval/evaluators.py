"""What `python -m facenet_jax.evaluate` can run besides its default, the LFW protocol on a
run's test split or on a folder + pairs file (eval.evaluate):

- BENCHMARK_EVALUATORS: benchmarks of a trained run's latest checkpoint, each selected by its
  own flag (`--verification_sets FOLDER`: insightface .bin sets, eval.verification_sets;
  `--ijb ROOT`: IJB-B/C 1:1, eval.ijb), run in registration order;
- BASELINE_EVALUATORS: `--baseline NAME --config CONFIG` floors that need no trained run (raw
  pixels, eval.evaluate).

Every entry is registered here, in one place: a new benchmark is its module, one registration
below and its flags in eval.cli.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable
from typing import Any

from facenet_jax.config import overrides_from_texts
from facenet_jax.eval import evaluate, ijb, verification_sets
from facenet_jax.registry import Registry


@dataclasses.dataclass(frozen=True)
class BenchmarkEvaluator:
    """flag: the evaluate CLI flag holding the benchmark's data (given: it runs); writes: what
    it writes, for messages ("DIR/eval_<name>.json"); run(flags, flip) -> the text the CLI
    prints (its summary and the file written), writing to flags.output when given (the CLI
    takes --output only when one benchmark runs)."""

    flag: str
    writes: str
    run: Callable[[Any, bool], str]


BENCHMARK_EVALUATORS: Registry[BenchmarkEvaluator] = Registry("benchmark")
# `--baseline NAME` → evaluate(config, output path or None) -> the evaluation dict (eval.json
# keys), computed on the pairs and images the config's run is evaluated on.
BASELINE_EVALUATORS: Registry[Callable[..., dict[str, Any]]] = Registry("baseline")


def selected_benchmarks(flags: Any) -> list[BenchmarkEvaluator]:
    """The benchmark evaluators whose flag is given, in registration order."""
    return [evaluator for evaluator in map(BENCHMARK_EVALUATORS.get, BENCHMARK_EVALUATORS.names())
            if getattr(flags, evaluator.flag)]


def _verification_sets_from_flags(flags: Any, flip: bool) -> str:
    """`python -m facenet_jax.evaluate --workdir DIR --verification_sets FOLDER [--names]
    [--output FILE]`."""
    output = verification_sets.output_path(flags.workdir, flags.output)
    results = verification_sets.evaluate_workdir_sets(
        flags.workdir, flags.verification_sets, names=flags.names, flip=flip, output=output,
        eval_overrides=overrides_from_texts(flags.run_config))
    return f"{verification_sets.markdown_table(results)}\nwrote {output}"


def _ijb_from_flags(flags: Any, flip: bool) -> str:
    """`python -m facenet_jax.evaluate --workdir DIR --ijb ROOT --ijb_name IJBB|IJBC
    [--output FILE]`."""
    output = (pathlib.Path(flags.output) if flags.output
              else ijb.output_path(flags.workdir, flags.ijb_name))
    result = ijb.evaluate_workdir_ijb(flags.workdir, flags.ijb, flags.ijb_name, flip=flip,
                                      use_detector_score=flags.ijb_detector_score,
                                      output=output)
    return f"{ijb.format_ijb_summary(result)}\nwrote {output}"


BENCHMARK_EVALUATORS.add("verification_sets", BenchmarkEvaluator(
    flag="verification_sets", writes=f"--output or DIR/{verification_sets.OUTPUT_FILE}",
    run=_verification_sets_from_flags))
BENCHMARK_EVALUATORS.add("ijb", BenchmarkEvaluator(
    flag="ijb", writes="--output or DIR/eval_<ijb>.json", run=_ijb_from_flags))
BASELINE_EVALUATORS.add("pixels", evaluate.evaluate_pixels)
BASELINES = BASELINE_EVALUATORS.names()
