"""α × mining strategy × distance on Extended Yale B (experiments/yaleb.py).

5 margins × 6 strategies × 2 distances = 60 cells, one seed, each the Yale B run shortened to
200 steps (`common`). On this project's 2-core CPU shared with other jobs a cell took 25–75 s,
start-up, data (from the folder's memory-mapped cache), compile and evaluation included; the
whole sweep under an hour. The measured time of every cell is the wall_s column of
experiments/results/yaleb_margin_strategy/results.md.

        python -m facenet_jax.sweep --sweep experiments/sweeps/yaleb_margin_strategy.py \
            --workdir runs/sweeps/yaleb_margin_strategy

With more time: drop `common` for the full 800-step runs and pass seeds=(0, 1, 2) to `grid`.
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
