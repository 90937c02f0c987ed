"""Training: step.py (the per-device step over the mesh), loop.py (resume, periodic actions,
final evaluations), __main__.py (the CLI: `python -m facenet_jax.train`)."""

from facenet_jax import data  # noqa: F401  (tests patch train.data.load_dataset)
from facenet_jax.objectives import LossSpec
from facenet_jax.state import build_model, build_optimizer, create_train_state
from facenet_jax.train.loop import (LOCK_FILE, STEP_STATS, TRAINING_CURVES_FILE,
                                    NonFiniteLossError, PeriodicAction, train_and_evaluate)
# The run-folder helpers the fault tests and the input benchmark call, until they move out.
from facenet_jax.train.loop import (_check_resume_config, _device_batches,  # noqa: F401
                                    _exclusive_workdir, _write_config)
from facenet_jax.train.step import AXIS, make_train_step, psum_replicated, train_step

__all__ = ["AXIS", "LOCK_FILE", "STEP_STATS", "TRAINING_CURVES_FILE", "LossSpec",
           "NonFiniteLossError", "PeriodicAction", "build_model", "build_optimizer",
           "create_train_state", "data", "make_train_step", "psum_replicated",
           "train_and_evaluate", "train_step"]
