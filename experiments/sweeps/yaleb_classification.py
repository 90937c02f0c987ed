"""The classification table of experiments/sweeps/default_classification.py on Extended Yale B
(experiments/yaleb.py as it is: small_cnn at 48 px, 800 steps, batch 16×8 = 128, Adam 3e-3),
3 seeds: the Yale B table of docs/classification_baselines.md.

Reproduces: triplet `semihard` and `hardest` (soft), softmax, CosFace, ArcFace (paper s and m),
combined (ArcFace + semihard) and ArcFace 400 steps → `semihard` 400 steps (two cells, the second
starting from the first's encoder), on 23 training identities under strong lighting changes;
see the default sweep's docstring for the rows. The heads keep the paper's s = 64 (see
docs/classification_baselines.md). `data.pairs.seed` is pinned to 0.
Hardware: a 2-core CPU. Time: measured here (shared CPU, nice 10, one run at a time): 24 runs
(8 cells × 3 seeds) in 27 min of wall time, 30–115 s per run.

        python -m facenet_jax.sweep --sweep experiments/sweeps/yaleb_classification.py \
            --workdir runs/sweeps/yaleb_classification [--parallel N]

data.root: as experiments/yaleb.py (../shared/data/extended_yaleb when present). `base` is
relative to this file.
"""

import pathlib
import runpy

NUM_STEPS = 800  # experiments/yaleb.py's
_TABLE = runpy.run_path(str(pathlib.Path(__file__).with_name("default_classification.py")))


def get_sweep() -> dict:
    return {"name": "yaleb_classification", "base": "../yaleb.py", "common": _TABLE["COMMON"],
            "cells": _TABLE["table_cells"](NUM_STEPS), "seeds": list(_TABLE["SEEDS"])}
