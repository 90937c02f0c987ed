"""α × mining strategy × distance on Extended Yale B (experiments/yaleb.py).

5 margins × 6 strategies × 2 distances = 60 cells, one seed, each the Yale B run shortened to
`num_steps` below so the whole sweep runs within about an hour on the 2-core CPU (see
experiments/results/yaleb_margin_strategy/ for the measured times).

        python -m facenet_jax.sweep --sweep experiments/sweeps/yaleb_margin_strategy.py \
            --workdir runs/sweeps/yaleb_margin_strategy

`base` is relative to this file.
"""

from facenet_jax.sweep import grid

MARGINS = (0.05, 0.1, 0.2, 0.5, 1.0)
STRATEGIES = ("random", "semihard", "semihard_facenet", "hardest", "all", "distance_weighted")
DISTANCES = ("squared", "euclidean")


def get_sweep() -> dict:
    return {
        "name": "yaleb_margin_strategy",
        "base": "../yaleb.py",
        "common": {"num_steps": 200, "log_every": 20, "eval_every": 200,
                   "checkpoint_every": 200, "optimizer.warmup_steps": 20},
        "cells": grid({"loss.distance": DISTANCES, "loss.strategy": STRATEGIES,
                       "loss.margin": MARGINS}),
    }
