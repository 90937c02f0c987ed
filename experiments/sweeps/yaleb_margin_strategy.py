"""α × mining strategy on Extended Yale B (experiments/yaleb.py), squared distance.

3 margins × 6 strategies = 18 cells, one seed, each the Yale B run shortened to 200 steps
(`common`). Squared distance only (FaceNet's); the α-versus-distance comparison is made on the
synthetic data by default_margin_strategy.py, which sweeps both. Sized so this sweep and the
synthetic one run back to back in about 1.5 hours on this project's 2-core CPU shared with
other jobs: a cell takes about 60–150 s there, start-up, data, compile and evaluation included
(the measured time of every cell is the wall_s column of
experiments/results/yaleb_margin_strategy/results.md).

        python -m facenet_jax.sweep --sweep experiments/sweeps/yaleb_margin_strategy.py \
            --workdir runs/sweeps/yaleb_margin_strategy

With more time: MARGINS = (0.05, 0.1, 0.2, 0.5, 1.0), DISTANCES = ("squared", "euclidean")
(60 cells), and drop `common` for the full 800-step runs. `base` is relative to this file.
"""

from facenet_jax.sweep import grid

MARGINS = (0.05, 0.2, 1.0)
STRATEGIES = ("random", "semihard", "semihard_facenet", "hardest", "all", "distance_weighted")
DISTANCES = ("squared",)


def get_sweep() -> dict:
    return {
        "name": "yaleb_margin_strategy",
        "base": "../yaleb.py",
        "common": {"num_steps": 200, "log_every": 20, "eval_every": 200,
                   "checkpoint_every": 200, "optimizer.warmup_steps": 20},
        "cells": grid({"loss.distance": DISTANCES, "loss.strategy": STRATEGIES,
                       "loss.margin": MARGINS}),
    }
