"""Pairwise distances between embeddings, with gradients finite where two embeddings coincide.

Three kinds, named by `distance` everywhere in the project (a margin means nothing without its
distance: FaceNet's α = 0.2 is in squared distance between unit vectors, TF-Addons' margin 1.0 in
non-squared distance, so configs set the two together):

- "squared": ||a - b||², FaceNet's (range [0, 4] on unit vectors).
- "euclidean": ||a - b|| (TF-Addons' "L2").
- "cosine": 1 - cos(a, b) (range [0, 2]).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

DISTANCES = ("squared", "euclidean", "cosine")

# Below this squared norm a vector counts as zero (its direction is undefined): L2 normalisation
# keeps it (near-)zero, finitely, and its cosine with anything is 0, i.e. distance 1, with a
# finite gradient. metrics' float64 distances use the same floor.
TINY_SQUARED_NORM = 1e-12


def check_distance(distance: str, name: str = "distance") -> None:
    """ValueError naming `name` (e.g. the config key) and the valid kinds when `distance` is not
    one of DISTANCES."""
    if distance not in DISTANCES:
        raise ValueError(f"unknown {name} {distance!r}; valid distances: {', '.join(DISTANCES)}")


def _squared_euclidean(queries: jax.Array, candidates: jax.Array) -> jax.Array:
    """[M,D], [B,D] -> [M,B]: ||q||² + ||c||² - 2 q·c, clamped at 0 (rounding can go below)."""
    dots = queries @ candidates.T
    squared = (jnp.sum(queries**2, axis=1)[:, None] + jnp.sum(candidates**2, axis=1)[None, :]
               - 2.0 * dots)
    return jnp.maximum(squared, 0.0)


def _safe_sqrt(squared: jax.Array) -> jax.Array:
    """sqrt with a finite gradient at 0 (the double-`where` trick; 0 there)."""
    positive = squared > 0.0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, squared, 1.0)), 0.0)


def l2_normalize(x: jax.Array) -> jax.Array:
    """[N, D] -> [N, D] float32 rows of unit L2 norm; a (near-)zero row stays (near-)zero, with
    a finite gradient. The encoders' embedding head and the cosine distance both use it."""
    x = x.astype(jnp.float32)
    squared_norm = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(squared_norm, TINY_SQUARED_NORM))


def pairwise_distances_between(queries: jax.Array, candidates: jax.Array,
                               distance: str) -> jax.Array:
    """Distances between every query and every candidate.

    queries: [M,D], candidates: [B,D] -> [M,B] float. No entry is forced to 0: a query that is
    also a candidate gets whatever rounding gives (≥ 0); use `pairwise_distances` (or
    `anchor_distance_rows`) for a batch against itself.
    """
    check_distance(distance)
    if distance == "cosine":
        cosine = l2_normalize(queries) @ l2_normalize(candidates).T
        return jnp.clip(1.0 - cosine, 0.0, 2.0)
    squared = _squared_euclidean(queries, candidates)
    return squared if distance == "squared" else _safe_sqrt(squared)


def anchor_distance_rows(embeddings: jax.Array, anchor_start: jax.Array | int, num_anchors: int,
                         distance: str) -> jax.Array:
    """Rows [anchor_start, anchor_start + num_anchors) of the batch's distance matrix.

    embeddings: [B,D]; anchor_start may be traced; num_anchors is static -> [num_anchors, B].
    Each anchor's distance to itself is exactly 0 (TF-Addons' convention), with zero gradient,
    so a row computed on any device equals that row of `pairwise_distances` on the whole batch.
    """
    check_distance(distance)
    anchors = jax.lax.dynamic_slice_in_dim(embeddings, anchor_start, num_anchors, axis=0)
    rows = pairwise_distances_between(anchors, embeddings, distance)
    is_self = (anchor_start + jnp.arange(num_anchors))[:, None] == jnp.arange(
        embeddings.shape[0])[None, :]
    return jnp.where(is_self, 0.0, rows)


def pairwise_distances(embeddings: jax.Array, distance: str) -> jax.Array:
    """[B,D] -> [B,B] distances, diagonal exactly 0, gradients finite for duplicates/collapse."""
    return anchor_distance_rows(embeddings, 0, embeddings.shape[0], distance)


def euclidean_on_sphere(distances: jax.Array, distance: str) -> jax.Array:
    """Converts distances between *unit* vectors to Euclidean distances (any shape).

    squared -> sqrt(d); euclidean -> d; cosine -> sqrt(2 d) (since ||a-b||² = 2 - 2 cos).
    Used for distance-weighted sampling, whose density is defined on Euclidean distance.
    """
    check_distance(distance)
    if distance == "euclidean":
        return distances
    return _safe_sqrt(distances if distance == "squared" else 2.0 * distances)
