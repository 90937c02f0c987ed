"""Cross-batch memory (XBM) on Extended Yale B (experiments/yaleb.py as it is: 800 steps, 8
images per identity, semi-hard, α = 0.2 on squared distance), 3 seeds each.

Cells: 4×8; 4×8 with a memory of 512 embeddings (16 small batches, 4 of the large one, about
a third of the 23 training people's images) mined from step 200 (a quarter of the run) at
weight 1; and 16×8, the batch it imitates (the config's own). The results and their reading
are in docs/large_batch_mining.md.

        python -m facenet_jax.sweep --sweep experiments/sweeps/yaleb_xbm.py \
            --workdir runs/sweeps/yaleb_xbm

`base` is relative to this file.
"""

import pathlib
import runpy

_XBM = runpy.run_path(str(pathlib.Path(__file__).with_name("xbm.py")))


def get_sweep() -> dict:
    return {"name": "yaleb_xbm", "base": "../yaleb.py", "common": {"data.pairs.seed": 0},
            "cells": _XBM["xbm_cells"](4, 16, {"size": 512, "start_step": 200, "weight": 1.0})}
