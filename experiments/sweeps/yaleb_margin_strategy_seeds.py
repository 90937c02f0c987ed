"""α × mining strategy over 3 seeds at the full schedule, on Extended Yale B
(experiments/yaleb.py): the re-run that is to replace the 200-step, one-seed tables.

3 margins × 6 strategies on squared distance × seeds 0, 1, 2 = 54 runs, each the Yale B
config's full 800 steps. `data.pairs.seed` is pinned to 0 so the seeds vary training only and
every seed is scored on the same test pairs. Measured here: one run 142 s wall (54 s CPU) on the
shared, loaded 2-core CPU, so about 2 h for the sweep at that load (under 1 h on an idle
host with `--parallel 2`); see docs/experiments.md for the plan.

        python -m facenet_jax.sweep --sweep experiments/sweeps/yaleb_margin_strategy_seeds.py \
            --workdir runs/sweeps/yaleb_margin_strategy_seeds [--parallel N]

`base` is relative to this file.
"""

from facenet_jax.sweep import grid

MARGINS = (0.05, 0.2, 1.0)
STRATEGIES = ("random", "semihard", "semihard_facenet", "hardest", "all", "distance_weighted")
DISTANCES = ("squared",)
SEEDS = (0, 1, 2)


def get_sweep() -> dict:
    return {
        "name": "yaleb_margin_strategy_seeds",
        "base": "../yaleb.py",
        "common": {"data.pairs.seed": 0},
        "cells": grid({"loss.distance": DISTANCES, "loss.strategy": STRATEGIES,
                       "loss.margin": MARGINS}),
        "seeds": list(SEEDS),
    }
