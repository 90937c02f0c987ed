"""Batch-hard with and without a semi-hard warm-up, against semi-hard, on synthetic faces
(experiments/default.py as it is: 1,200 steps), 3 seeds each.

Cells: `semihard`; `hardest` (batch-hard, Hermans et al. 2017) from step 0; `hardest` after
`loss.warmup_steps` = 300 steps of `semihard` mining (`loss.warmup_strategy`). Everything else
is the default config (α = 0.2 on squared distance, Adam at 3e-3, cosine schedule). The results
and the measured times are in docs/outputs_and_verification.md.

        python -m facenet_jax.sweep --sweep experiments/sweeps/batch_hard_recipe.py \
            --workdir runs/sweeps/batch_hard_recipe

`base` is relative to this file.
"""

WARMUP_STEPS = 300  # a quarter of the 1,200 steps
SEEDS = (0, 1, 2)
COMMON = {"loss.margin": 0.2, "loss.distance": "squared"}  # the base's: α set with its distance


def recipe_cells(warmup_steps: int, seeds: tuple[int, ...] = SEEDS) -> list[dict]:
    """semihard, hardest after `warmup_steps` of semihard, hardest alone; each once per seed
    (yaleb_batch_hard_recipe.py uses it too)."""
    variants = [{"loss.strategy": "semihard"},
                {"loss.strategy": "hardest", "loss.warmup_strategy": "semihard",
                 "loss.warmup_steps": warmup_steps},
                {"loss.strategy": "hardest"}]
    return [{**variant, "seed": seed} for variant in variants for seed in seeds]


def get_sweep() -> dict:
    return {"name": "batch_hard_recipe", "base": "../default.py", "common": COMMON,
            "cells": recipe_cells(WARMUP_STEPS)}
