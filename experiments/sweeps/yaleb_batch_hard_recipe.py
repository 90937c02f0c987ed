"""Batch-hard with and without a semi-hard warm-up, against semi-hard, on Extended Yale B
(experiments/yaleb.py as it is: 800 steps), 3 seeds each.

Cells: `semihard`; `hardest` from step 0; `hardest` after `loss.warmup_steps` = 200 steps of
`semihard` mining (`loss.warmup_strategy`). Everything else is the Yale B config (α = 0.2 on
squared distance, Adam at 3e-3, cosine schedule). Here the quarter-length warm-up collapses (3
of 3 seeds); half (--config.loss.warmup_steps=400, run outside this sweep) trains. The results
and the measured times are in docs/outputs_and_verification.md.

        python -m facenet_jax.sweep --sweep experiments/sweeps/yaleb_batch_hard_recipe.py \
            --workdir runs/sweeps/yaleb_batch_hard_recipe

`base` is relative to this file.
"""

import pathlib
import runpy

WARMUP_STEPS = 200  # a quarter of the 800 steps
_RECIPE = runpy.run_path(str(pathlib.Path(__file__).with_name("batch_hard_recipe.py")))


def get_sweep() -> dict:
    return {"name": "yaleb_batch_hard_recipe", "base": "../yaleb.py",
            "common": _RECIPE["COMMON"], "cells": _RECIPE["recipe_cells"](WARMUP_STEPS)}
