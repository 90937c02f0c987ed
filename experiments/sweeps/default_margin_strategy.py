"""α × mining strategy × distance on the default synthetic data (experiments/default.py).

5 margins × 6 strategies × 2 distances = 60 cells, one seed. Sized to run within about an hour
on the 2-core CPU: each cell is the default run shortened to `num_steps` below (compile and
evaluation included in each cell's wall time; see experiments/results/default_margin_strategy/).

        python -m facenet_jax.sweep --sweep experiments/sweeps/default_margin_strategy.py \
            --workdir runs/sweeps/default_margin_strategy

For the full-length version, drop the `common` num_steps and add seeds=(0, 1, 2) to the grid.
`base` is relative to this file.
"""

from facenet_jax.sweep import grid

MARGINS = (0.05, 0.1, 0.2, 0.5, 1.0)
STRATEGIES = ("random", "semihard", "semihard_facenet", "hardest", "all", "distance_weighted")
DISTANCES = ("squared", "euclidean")


def get_sweep() -> dict:
    return {
        "name": "default_margin_strategy",
        "base": "../default.py",
        "common": {"num_steps": 200, "log_every": 20, "eval_every": 200,
                   "checkpoint_every": 200, "optimizer.warmup_steps": 20},
        "cells": grid({"loss.distance": DISTANCES, "loss.strategy": STRATEGIES,
                       "loss.margin": MARGINS}),
    }
