"""facenet-jax: face embeddings with the triplet loss and on-device triplet mining."""

__version__ = "0.1.0"
