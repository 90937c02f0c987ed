"""Cross-batch memory (XBM, Wang et al. 2020) on synthetic faces (experiments/default.py as it
is: 1,200 steps, semi-hard, α = 0.2 on squared distance), 3 seeds each.

Cells: a small batch, 8×4; the same with a memory of 1,024 embeddings (32 small batches, 8
of the large one) mined from step 300 (a quarter of the run) at weight 1; and the large batch
it imitates, the default's 32×4. `data.pairs.seed` is pinned so every seed is scored on the
same pairs. The results and their reading are in docs/large_batch_mining.md.

        python -m facenet_jax.sweep --sweep experiments/sweeps/xbm.py --workdir runs/sweeps/xbm

`base` is relative to this file.
"""

SEEDS = (0, 1, 2)


def xbm_cells(small: int, large: int, memory: dict, seeds: tuple[int, ...] = SEEDS
              ) -> list[dict]:
    """P = small, P = small with `memory` (loss.memory.* values), P = large; each per seed
    (yaleb_xbm.py uses it too)."""
    memory_keys = {f"loss.memory.{key}": value for key, value in memory.items()}
    variants = [{"batch.identities": small}, {"batch.identities": small, **memory_keys},
                {"batch.identities": large}]
    return [{**variant, "seed": seed} for variant in variants for seed in seeds]


def get_sweep() -> dict:
    return {"name": "xbm", "base": "../default.py", "common": {"data.pairs.seed": 0},
            "cells": xbm_cells(8, 32, {"size": 1024, "start_step": 300, "weight": 1.0})}
