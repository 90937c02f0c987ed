"""α × mining strategy over 3 seeds at the full schedule, on the default synthetic data
(experiments/default.py): the re-run that is to replace the 200-step, one-seed tables.

3 margins × 6 strategies on squared distance (the cells that carry the reading in
docs/experiments.md: α's ends and FaceNet's 0.2) × seeds 0, 1, 2 = 54 runs, each the default's full 1,200 steps (no
`common` shortening). `data.pairs.seed` is pinned to 0 so the seeds vary training only and every
seed is scored on the same test pairs (those of the 200-step tables, whose seed was 0). Measured
here: one run 77 s wall (55 s CPU) on the shared 2-core CPU, so about 70 min for the sweep one
run at a time (about 25 min of CPU per core with `--parallel 2` on an idle 2-core host); see
docs/sweeps.md for the plan.

        python -m facenet_jax.sweep --sweep experiments/sweeps/default_margin_strategy_seeds.py \
            --workdir runs/sweeps/default_margin_strategy_seeds [--parallel N]

`base` is relative to this file.
"""

from facenet_jax.sweep import grid

MARGINS = (0.05, 0.2, 1.0)
STRATEGIES = ("random", "semihard", "semihard_facenet", "hardest", "all", "distance_weighted")
DISTANCES = ("squared",)
SEEDS = (0, 1, 2)


def get_sweep() -> dict:
    return {
        "name": "default_margin_strategy_seeds",
        "base": "../default.py",
        "common": {"data.pairs.seed": 0},
        "cells": grid({"loss.distance": DISTANCES, "loss.strategy": STRATEGIES,
                       "loss.margin": MARGINS}),
        "seeds": list(SEEDS),
    }
