"""Batch-hard with and without a semi-hard warm-up, against semi-hard, on Extended Yale B
(experiments/yaleb.py as it is: 800 steps), 3 seeds each.

Cells: `semihard`; `hardest` from step 0; `hardest` after `loss.warmup_steps` = 200 steps of
`semihard` mining (`loss.warmup_strategy`). Everything else is the Yale B config (α = 0.2 on
squared distance, Adam at 3e-3, cosine schedule). The results and the measured times are in
docs/outputs_and_verification.md.

        python -m facenet_jax.sweep --sweep experiments/sweeps/yaleb_batch_hard_recipe.py \
            --workdir runs/sweeps/yaleb_batch_hard_recipe

`base` is relative to this file.
"""

WARMUP_STEPS = 200  # a quarter of the 800 steps
SEEDS = (0, 1, 2)


def get_sweep() -> dict:
    variants = [{"loss.strategy": "semihard"}, {"loss.strategy": "hardest"},
                {"loss.strategy": "hardest", "loss.warmup_strategy": "semihard",
                 "loss.warmup_steps": WARMUP_STEPS}]
    return {
        "name": "yaleb_batch_hard_recipe",
        "base": "../yaleb.py",
        "cells": [{**variant, "seed": seed} for variant in variants for seed in SEEDS],
    }
