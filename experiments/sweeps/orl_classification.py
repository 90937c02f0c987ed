"""The classification table of experiments/sweeps/default_classification.py on ORL
(experiments/orl.py as it is: small_cnn at 48 px, 600 steps, batch 8×5 = 40, Adam 3e-3), 3 seeds:
the ORL table of docs/classification_baselines.md.

Reproduces: triplet `semihard` and `hardest` (soft), softmax, CosFace, ArcFace (paper s and m),
combined (ArcFace + semihard) and ArcFace 300 steps → `semihard` 300 steps (two cells, the second
starting from the first's encoder), on 24 training identities; see the default sweep's
docstring for the rows. The heads train on those 24 classes with the paper's s = 64: see
docs/classification_baselines.md for how that fares on so few classes (the paper default is kept
in the table). `data.pairs.seed` is pinned to 0.
Hardware: a 2-core CPU. Time: measured here (shared CPU, nice 10, one run at a time): 24 runs
(8 cells × 3 seeds) in 15 min of wall time, 24–55 s per run.

        python -m facenet_jax.sweep --sweep experiments/sweeps/orl_classification.py \
            --workdir runs/sweeps/orl_classification [--parallel N]

data.root: as experiments/orl.py (../shared/data/orl_faces when present). `base` is relative to
this file.
"""

import pathlib
import runpy

NUM_STEPS = 600  # experiments/orl.py's
_TABLE = runpy.run_path(str(pathlib.Path(__file__).with_name("default_classification.py")))


def get_sweep() -> dict:
    return {"name": "orl_classification", "base": "../orl.py", "common": _TABLE["COMMON"],
            "cells": _TABLE["table_cells"](NUM_STEPS), "seeds": list(_TABLE["SEEDS"])}
