"""`python -m facenet_jax.sweep ...`: the sweep CLI (facenet_jax.sweep.main)."""

from facenet_jax.sweep import main

main()
