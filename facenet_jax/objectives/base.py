"""The interface between the train step and what it optimises besides the encoder.

An objective turns one device's embeddings into additive loss sums, one entry per *term*
(`{"triplet": sums, "memory": sums}`): each term's `loss_sum` and `count` add up over devices
and over a split batch, so `weighted_objective` gives exactly the one-device mean on any mesh.
It may own parameters (e.g. class centres), each with a PartitionSpec: `P()` for a replicated
leaf, whose gradient the step psums over the mesh axis, or `P(AXIS)` for one sharded along its
first dimension, whose gradient stays on its device. It may also own non-trained state (e.g. a
cross-batch memory), identical on every device, that `update` advances after each step.

The step (train/step.py) calls, per device under shard_map with axis `parallel.AXIS`:

    terms = objective.sums(params, extra, embeddings, labels, key)       # differentiated
    value = weighted_objective(terms, objective.term_weights)            # its psum = the mean
    metrics = objective.reduce(psum(terms), extra)                       # keys: stats_keys
    extra = objective.update(extra, embeddings, labels, step)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import jax
import jax.numpy as jnp
from jax import lax

from facenet_jax.parallel import AXIS

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
        """Its parameters as global arrays ({} for none)."""

    def param_specs(self) -> Any:
        """A PartitionSpec per parameter leaf (or subtree): P() replicated, P(AXIS) sharded
        along the first dimension."""

    def init_extra(self, embedding_dim: int) -> Any:
        """The non-trained state a run starts with, or None."""

    def sums(self, params: Any, extra: Any, embeddings: jax.Array, labels: jax.Array,
             key: jax.Array) -> Terms:
        """This device's additive sums. embeddings: [b,D] float32 (this device's rows);
        labels: int [b]; key: the step's key (the same on every device)."""

    def reduce(self, terms: Terms, extra: Any) -> dict[str, jax.Array]:
        """Metrics (`stats_keys`) from the sums over all devices, and the state before the
        step."""

    def update(self, extra: Any, embeddings: jax.Array, labels: jax.Array,
               step: jax.Array) -> Any:
        """The state after step `step` (counted from 0), given this device's rows."""

    def collapse_warning(self, rows: list[Mapping[str, float]], step: int) -> str | None:
        """A warning when the logged training rows show collapsed embeddings, else None."""


def weighted_objective(terms: Terms, weights: Mapping[str, float]) -> jax.Array:
    """Σ_t w_t · loss_sum_t / (the global count_t): this device's share of the weighted mean
    (per device, under the mesh axis). Its sum over devices is the mean of the whole batch, so
    the psum of the per-device gradients is the gradient of that mean (parallel.py)."""
    value = jnp.zeros((), jnp.float32)
    for name, sums in terms.items():
        count = lax.psum(lax.stop_gradient(sums["count"]), AXIS)
        value += weights[name] * sums["loss_sum"] / jnp.maximum(count, 1.0)
    return value
