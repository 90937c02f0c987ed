"""α × mining strategy × distance on the default synthetic data (experiments/default.py).

5 margins × 6 strategies × 2 distances = 60 cells (the issue's grid), one seed, each the default
run shortened to 200 steps (`common`; the cosine schedule still decays to 0 within them). On
this project's 2-core CPU shared with other jobs a cell took 25–155 s, start-up, synthetic data,
compile and evaluation included (about 40 s when the CPU is nearly idle); the whole sweep about
an hour. The measured time of every cell is the wall_s column of
experiments/results/default_margin_strategy/results.md.

        python -m facenet_jax.sweep --sweep experiments/sweeps/default_margin_strategy.py \
            --workdir runs/sweeps/default_margin_strategy

With more time: drop `common` (the full 1,200-step runs) and pass seeds=(0, 1, 2) to `grid`.
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
