"""Training: step.py (the per-device step over the mesh), loop.py (resume, periodic actions,
final evaluations), __main__.py (the CLI: `python -m facenet_jax.train`)."""

from facenet_jax import data  # noqa: F401  (tests patch train.data.load_dataset)
from facenet_jax.objectives import LossSpec
from facenet_jax.runfiles import LOCK_FILE, TRAINING_CURVES_FILE
from facenet_jax.state import build_model, build_optimizer, create_train_state
from facenet_jax.train.loop import (STEP_STATS, NonFiniteLossError, PeriodicAction,
                                    device_batches, train_and_evaluate)
from facenet_jax.train.step import AXIS, make_train_step, psum_replicated, train_step

__all__ = ["AXIS", "LOCK_FILE", "STEP_STATS", "TRAINING_CURVES_FILE", "LossSpec",
           "NonFiniteLossError", "PeriodicAction", "build_model", "build_optimizer",
           "create_train_state", "data", "device_batches", "make_train_step", "psum_replicated",
           "train_and_evaluate", "train_step"]
