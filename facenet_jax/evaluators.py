"""What `python -m facenet_jax.evaluate` can run besides its default, the LFW protocol on a
run's test split or on a folder + pairs file (evaluate.py):

- BENCHMARK_EVALUATORS: benchmarks of a trained run's latest checkpoint, each selected by its
  own flag (`--verification_sets FOLDER`: insightface .bin sets, verification_sets.py;
  `--ijb ROOT`: IJB-B/C 1:1, ijb.py), run in registration order;
- BASELINE_EVALUATORS: `--baseline NAME --config CONFIG` floors that need no trained run (raw
  pixels, evaluate.py).

Each is registered in the module that defines it, so a new benchmark is its module, one
registration and its flags in evaluate.py's `__main__`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

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
