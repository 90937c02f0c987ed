"""The train step over global arrays (jit with NamedSharding) and its compiled form.

The step sees the whole batch as one array sharded along its rows over the mesh axis `AXIS`,
the encoder and its optimizer state replicated, and the objective's own parameters (class
centres) and their optimizer state laid out by the objective's `param_specs` (split along the
classes). jit partitions the encoder's forward and backward pass (BatchNorm's batch statistics
are the global batch's), the gradient reduction, the optimizer (one optax chain over
{"encoder", "head"}, clipped by the global norm of the whole tree) and the memory's update.
Only the objective's additive sums run per device, under `shard_map` (`objective_terms`):
each device mines its own anchors against the all-gathered batch in blocks, or within its
shard (parallel.mining="local"), or scores the gathered batch against its class shard (the
vocabulary-parallel softmax, Partial FC's sample): code whose point is to be per device.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from facenet_jax import optim, parallel
from facenet_jax.objectives import (LossSpec, Objective, Terms, TripletObjective,
                                    weighted_objective)
from facenet_jax.state import TrainState

AXIS = parallel.AXIS
# Folded into the step's key for the encoder's dropout masks: the mining keys stay as they were.
_DROPOUT_STREAM = 0xD0


def _objective(objective: Objective | None, loss: LossSpec | None, mining: str) -> Objective:
    """`objective`, or the triplet objective that `loss` and `mining` stand for."""
    if (objective is None) == (loss is None):
        raise TypeError("pass either objective= or loss= (with mining=) to the train step")
    return objective if objective is not None else TripletObjective(loss, mining)


def objective_terms(objective: Objective, mesh: jax.sharding.Mesh, params: Any, extra: Any,
                    embeddings: jax.Array, labels: jax.Array, key: jax.Array) -> Terms:
    """The objective's additive sums of the whole batch: its per-device `sums` under
    shard_map (embeddings [B,D] and labels [B] split along the batch, `params` by the
    objective's `param_specs`, `extra` and `key` replicated), psum'd over the mesh.

    check_vma=True types each value as varying over the devices or not, so a gradient taken
    outside (the step's `jax.grad`) transposes the collectives exactly: the all_gather of
    the batch to a psum_scatter that routes each candidate's gradient to its device, the final
    psum to a broadcast; sharded parameters' gradients stay on their device."""
    def per_device(params: Any, extra: Any, embeddings: jax.Array, labels: jax.Array,
                   key: jax.Array) -> Terms:
        return lax.psum(objective.sums(params, extra, embeddings, labels, key), AXIS)
    return jax.shard_map(per_device, mesh=mesh,
                         in_specs=(objective.param_specs(), P(), P(AXIS), P(AXIS), P()),
                         out_specs=P(), check_vma=True)(params, extra, embeddings, labels, key)


def train_step(state: TrainState, images: jax.Array, labels: jax.Array, *,
               mesh: jax.sharding.Mesh, model: Any, tx: optax.GradientTransformation,
               schedule: optax.Schedule, objective: Objective | None = None,
               loss: LossSpec | None = None, mining: str = "global",
               freeze_backbone_stats: bool = False) -> tuple[TrainState, dict[str, jax.Array]]:
    """One update of the whole batch, written over global arrays (jit it over `mesh`).

    images: the global batch, uint8 [B, H, W, 3] (whole identities per device with the P×K
    sampler), scaled to [0, 1] for `model`; or float features [B, C] given to `model` as they
    are (model.cached_features: `model` is then features_cache.FeatureHead); labels: int [B];
    both split along the batch over the mesh. `model` is built without a BN axis name
    (bn_axis_name=None): its batch statistics are the global batch's. `objective`
    (objectives/base.py) turns the embeddings into additive sums (`objective_terms`, the
    only per-device code); `loss`+`mining` is shorthand for `TripletObjective(loss, mining)`.
    The optimised value is the objective's weighted mean over the global batch; `tx` updates
    state.params {"encoder", "head"} (state.build_optimizer: one chain, clipped by the whole
    tree's global norm). Metrics are the objective's plus grad_norm (the global norm of the
    whole gradient tree, before clipping) and learning_rate. freeze_backbone_stats
    (backbone_lr_multiplier = 0): only the embedding head's BN statistics update.

    Keys: the step's key is fold_in(state.rng, state.step); the objective's mining and
    Partial FC draws fold their own streams into it, and the encoder's dropout masks
    (dropout_rate > 0) are drawn from fold_in(key, _DROPOUT_STREAM) over the global batch at
    once, so they do not depend on the device count (jit's partitioning never changes
    random values).
    """
    objective = _objective(objective, loss, mining)
    key = jax.random.fold_in(state.rng, state.step)
    dropout_key = jax.random.fold_in(key, _DROPOUT_STREAM)
    x = images.astype(jnp.float32) / 255.0 if images.dtype == jnp.uint8 else images

    def value(params: Any) -> tuple[jax.Array, tuple[Any, Any, Any]]:
        embeddings, updates = model.apply(
            {"params": params["encoder"], "batch_stats": state.batch_stats}, x, train=True,
            mutable=["batch_stats"], rngs={"dropout": dropout_key})
        terms = objective_terms(objective, mesh, params["head"], state.extra, embeddings,
                                labels, key)
        return (weighted_objective(terms, objective.term_weights),
                (terms, embeddings, updates["batch_stats"]))

    grads, (terms, embeddings, batch_stats) = jax.grad(value, has_aux=True)(state.params)
    if freeze_backbone_stats:
        batch_stats = optim.keep_backbone_stats(state.batch_stats, batch_stats)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new_state = state.replace(
        step=state.step + 1, params=optax.apply_updates(state.params, updates),
        batch_stats=batch_stats, opt_state=opt_state,
        extra=objective.update(state.extra, embeddings, labels, state.step))
    metrics = {**objective.reduce(terms, state.extra),
               "grad_norm": optax.tree.norm(grads), "learning_rate": schedule(state.step)}
    return new_state, metrics


def make_train_step(mesh: jax.sharding.Mesh, *, state_specs: Any = P(), **step_kwargs: Any):
    """`train_step` jitted over `mesh`: the state laid out by `state_specs` (a PartitionSpec
    prefix of it, `state.partition_specs`; all replicated by default) in and out, the batch
    split along its rows, the metrics replicated; the state buffers are donated."""
    model = step_kwargs.get("model")
    if getattr(model, "bn_axis_name", None) is not None:
        raise ValueError(f"the train step runs over global arrays: build its model with "
                         f"bn_axis_name=None (got {model.bn_axis_name!r})")
    state_shardings = jax.tree.map(lambda spec: NamedSharding(mesh, spec), state_specs,
                                   is_leaf=lambda x: isinstance(x, P))
    batch = parallel.batch_sharded(mesh)
    return jax.jit(functools.partial(train_step, mesh=mesh, **step_kwargs),
                   in_shardings=(state_shardings, batch, batch),
                   out_shardings=(state_shardings, parallel.replicated(mesh)),
                   donate_argnums=(0,))
