"""`python -m facenet_jax.sweep ...`: the sweep CLI (facenet_jax.sweep.main)."""

import sys

from facenet_jax.cli import one_line_user_errors
from facenet_jax.sweep import main

one_line_user_errors(main)(sys.argv[1:])
