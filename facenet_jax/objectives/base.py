"""The interface between the train step and what it optimises besides the encoder.

An objective turns one device's embeddings into additive loss sums, one entry per *term*
(`{"triplet": sums, "memory": sums}`): each term's `loss_sum` and `count` add up over devices
and over a split batch, so `weighted_objective` of the psum'd sums is exactly the one-device
mean on any mesh. It may own parameters (e.g. class centres), each with a PartitionSpec: `P()`
for a replicated leaf or `P(AXIS)` for one sharded along its first dimension; this is the one
place that says whether an objective has parameters ({} for none) and how they are laid out.
It may also own non-trained state (e.g. a cross-batch memory), replicated, that `update`
advances after each step.

The step (train/step.py) runs over global arrays and calls:

    terms = psum(objective.sums(params, extra, embeddings, labels, key))  # per device under
                                        # shard_map (step.objective_terms), differentiated
    value = weighted_objective(terms, objective.term_weights)            # the global mean
    metrics = objective.reduce(terms, extra)                             # keys: stats_keys
    extra = objective.update(extra, embeddings, labels, step)            # the global batch
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import jax
import jax.numpy as jnp
from jax import lax

Terms = dict[str, dict[str, jax.Array]]  # term name -> additive sums with loss_sum and count


class Objective(Protocol):
    """What the train step optimises; see the module docstring for the call order.

    Implementations are frozen dataclasses (hashable: static arguments of the compiled step).
    """

    # The metric keys `reduce` returns, in the order the training log writes them.
    stats_keys: tuple[str, ...]
    # (label, metric key, format) of the progress line's fields after the loss.
    progress_fields: tuple[tuple[str, str, str], ...]

    @property
    def term_weights(self) -> Mapping[str, float]:
        """Each term's weight in the optimised value."""

    def init(self, key: jax.Array, embedding_dim: int) -> Any:
        """Its parameters as global arrays ({} for none): the train state's params["head"]."""

    def param_specs(self) -> Any:
        """A PartitionSpec per parameter leaf: P() replicated, P(AXIS) sharded along the
        first dimension. The step's shard_map and the state's layout (state.partition_specs,
        the optimizer state's copies included) both read it."""

    def init_extra(self, embedding_dim: int) -> Any:
        """The non-trained state a run starts with, or None (the state then holds {})."""

    def sums(self, params: Any, extra: Any, embeddings: jax.Array, labels: jax.Array,
             key: jax.Array) -> Terms:
        """This device's additive sums, per device under shard_map (pmap semantics over
        AXIS). params: this device's part of them (its `param_specs`); embeddings: [b,D]
        float32 (this device's rows); labels: int [b]; key: the step's key (the same on every
        device)."""

    def reduce(self, terms: Terms, extra: Any) -> dict[str, jax.Array]:
        """Metrics (`stats_keys`) from the sums over all devices, and the state before the
        step."""

    def update(self, extra: Any, embeddings: jax.Array, labels: jax.Array,
               step: jax.Array) -> Any:
        """The state after step `step` (counted from 0), given the global batch's
        embeddings [B,D] and labels [B] (global arrays, outside shard_map)."""

    def collapse_warning(self, rows: list[Mapping[str, float]], step: int) -> str | None:
        """A warning when the logged training rows show collapsed embeddings, else None."""


def weighted_objective(terms: Terms, weights: Mapping[str, float]) -> jax.Array:
    """Σ_t w_t · loss_sum_t / count_t of the global (psum'd) sums: the weighted mean over the
    whole batch (a term with no count contributes 0). The counts are constants of the
    gradient."""
    value = jnp.zeros((), jnp.float32)
    for name, sums in terms.items():
        count = lax.stop_gradient(sums["count"])
        value += weights[name] * sums["loss_sum"] / jnp.maximum(count, 1.0)
    return value
