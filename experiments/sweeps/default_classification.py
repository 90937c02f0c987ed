"""Triplet mining against margin-softmax classification and the softmax → triplet recipe, on the
default synthetic data (experiments/default.py as it is: small_cnn, 1,200 steps, batch 128,
Adam 3e-3 with a cosine schedule), 3 seeds: the synthetic table of
docs/classification_baselines.md.

Reproduces: the comparison davidsandberg/facenet's README and insightface #312 report (softmax-
trained models above triplet-only ones), and the field's recipe of classification pre-training
then triplet fine-tuning, at the smoke scale. The table's rows, each a cell (the same encoder,
data, batch size and step budget N = num_steps of the dataset config):
  1. triplet `semihard` (α = 0.2, squared distance: the dataset config as it is);
  2. `hardest` with the soft margin (loss.soft=True);
  3. softmax, 4. CosFace, 5. ArcFace: loss.kind="classification" at the paper's s and m
     (s = 64; CosFace m = 0.35, ArcFace m = 0.5) on the uniform sampler (every training image
     once per epoch), the head's classes being the training identities;
  6. combined: ArcFace + 1.0 × semihard triplet loss of the same P×K batch;
  7. ArcFace for N/2 steps (its own row), then `semihard` for N/2 steps starting from its
     encoder (model.init_from=from_cell(...): a two-stage cell, docs/sweeps.md), fresh optimizer.
The learning rate is the dataset config's for every row: on this data ArcFace at the paper's
s = 64 and Adam 3e-3 reached 0.986 validation accuracy in a measured 1,200-step run (softmax
0.981), so the heads need no other rate here (validation split only; docs/classification_
baselines.md). `data.pairs.seed` is pinned to 0 so the seeds vary training only.
Hardware: a 2-core CPU. Time: measured here (shared CPU, nice 10, one run at a time): 24 runs
(8 cells × 3 seeds) in 30 min of wall time, 28–216 s per run as the machine's load varied.

        python -m facenet_jax.sweep --sweep experiments/sweeps/default_classification.py \
            --workdir runs/sweeps/default_classification [--parallel N]

`base` is relative to this file. `table_cells(num_steps)` builds the cells for the ORL and
Yale B sweeps too.
"""

from facenet_jax.sweep import from_cell

SEEDS = (0, 1, 2)
COMMON = {"data.pairs.seed": 0}
NUM_STEPS = 1200  # experiments/default.py's


def table_cells(num_steps: int) -> list[dict]:
    """The table's cells for a dataset config of `num_steps` steps (see the docstring)."""
    half = num_steps // 2
    classification = {"loss.kind": "classification", "data.sampler": "uniform"}
    arcface_half = {**classification, "loss.classification.head": "arcface", "num_steps": half}
    return [
        {"loss.strategy": "semihard"},
        {"loss.strategy": "hardest", "loss.soft": True},
        {**classification, "loss.classification.head": "softmax"},
        {**classification, "loss.classification.head": "cosface"},
        {**classification, "loss.classification.head": "arcface"},
        {"loss.kind": "combined", "loss.classification.head": "arcface",
         "loss.triplet_weight": 1.0},
        arcface_half,
        {"model.init_from": from_cell(arcface_half), "loss.strategy": "semihard",
         "num_steps": num_steps - half},
    ]


def get_sweep() -> dict:
    return {"name": "default_classification", "base": "../default.py", "common": COMMON,
            "cells": table_cells(NUM_STEPS), "seeds": list(SEEDS)}
