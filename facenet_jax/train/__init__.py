"""Training: step.py (the step over global arrays), loop.py (resume, periodic actions,
final evaluations), __main__.py (the CLI: `python -m facenet_jax.train`)."""

from facenet_jax.objectives import LossSpec
from facenet_jax.train.loop import (STEP_STATS, NonFiniteLossError, PeriodicAction,
                                    device_batches, train_and_evaluate)
from facenet_jax.train.step import AXIS, make_train_step, objective_terms, train_step

__all__ = ["AXIS", "STEP_STATS", "LossSpec", "NonFiniteLossError", "PeriodicAction",
           "device_batches", "make_train_step", "objective_terms", "train_and_evaluate",
           "train_step"]
