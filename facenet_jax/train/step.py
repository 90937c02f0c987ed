"""The per-device train step (pmap semantics over `parallel.AXIS`) and its compiled form."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.sharding import PartitionSpec as P

from facenet_jax import optim, parallel
from facenet_jax.objectives import LossSpec, Objective, TripletObjective, weighted_objective
from facenet_jax.state import HeadTrainState, TrainState

AXIS = parallel.AXIS
# Folded into the step's key for the encoder's dropout masks: the mining keys stay as they were.
_DROPOUT_STREAM = 0xD0


def _objective(objective: Objective | None, loss: LossSpec | None, mining: str) -> Objective:
    """`objective`, or the triplet objective that `loss` and `mining` stand for."""
    if (objective is None) == (loss is None):
        raise TypeError("pass either objective= or loss= (with mining=) to the train step")
    return objective if objective is not None else TripletObjective(loss, mining)


def train_step(state: TrainState, images: jax.Array, labels: jax.Array, *, model: Any,
               tx: optax.GradientTransformation, schedule: optax.Schedule,
               objective: Objective | None = None, loss: LossSpec | None = None,
               mining: str = "global", freeze_backbone_stats: bool = False,
               head_tx: optax.GradientTransformation | None = None,
               clip_norm: float | None = None) -> tuple[TrainState, dict[str, jax.Array]]:
    """One update, per device, with pmap semantics over the axis `AXIS`.

    images: this device's shard, uint8 [b, H, W, 3] (whole identities with the P×K sampler),
    scaled to [0, 1] for `model`; or float features [b, C] given to `model` as they are
    (model.cached_features: `model` is then features_cache.FeatureHead); labels: int [b].
    `objective` (objectives/base.py) turns the embeddings into additive sums; `loss`+`mining`
    is shorthand for `TripletObjective(loss, mining)`. The per-device value is the objective's
    share of the global mean (`weighted_objective`), so the psum of the per-device encoder
    gradients is the gradient of the whole batch's mean: the all_gather inside a global-mining
    objective transposes to a psum_scatter that routes each candidate's gradient back to the
    device that embedded it. Metrics are the objective's (from the psum'd sums) plus grad_norm
    and learning_rate. freeze_backbone_stats (backbone_lr_multiplier = 0): only the embedding
    head's BN statistics update. Dropout (an encoder with dropout_rate > 0) draws per device
    from the step's key.

    An objective with parameters (a `HeadTrainState`, e.g. class centres sharded over the
    mesh) is optimised by `head_tx`; the encoder's `tx` and `head_tx` then do not clip: the
    whole gradient tree is clipped here to `clip_norm` by its global norm, whose sharded
    leaves' squares are psum'd (grad_norm is that norm), so any mesh clips as one device.
    """
    objective = _objective(objective, loss, mining)
    key = jax.random.fold_in(state.rng, state.step)
    dropout_key = jax.random.fold_in(jax.random.fold_in(key, _DROPOUT_STREAM),
                                     lax.axis_index(AXIS))
    extra = state.objective_extra
    x = images.astype(jnp.float32) / 255.0 if images.dtype == jnp.uint8 else images

    def value(params: Any) -> tuple[jax.Array, tuple[Any, Any, Any]]:
        embeddings, updates = model.apply(
            {"params": params["encoder"], "batch_stats": state.batch_stats}, x, train=True,
            mutable=["batch_stats"], rngs={"dropout": dropout_key})
        terms = objective.sums(params["head"], extra, embeddings, labels, key)
        return (weighted_objective(terms, objective.term_weights),
                (terms, embeddings, updates["batch_stats"]))

    params = {"encoder": state.params, "head": state.objective_params}
    grads, (terms, embeddings, batch_stats) = jax.grad(value, has_aux=True)(params)
    specs = {"encoder": P(), "head": objective.param_specs()}
    grads = psum_replicated(grads, specs)
    if freeze_backbone_stats:
        batch_stats = optim.keep_backbone_stats(state.batch_stats, batch_stats)
    has_head = isinstance(state, HeadTrainState)
    if has_head:
        grad_norm = sharded_global_norm(grads, specs)
        if clip_norm:
            grads = jax.tree.map(lambda g: jnp.where(grad_norm < clip_norm, g,
                                                     g / grad_norm * clip_norm), grads)
    else:
        grad_norm = optax.global_norm(grads["encoder"])
    updates, opt_state = tx.update(grads["encoder"], state.opt_state, state.params)
    new_state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params,
                                                                              updates),
                              batch_stats=batch_stats, opt_state=opt_state)
    if has_head:
        head_updates, head_opt_state = head_tx.update(grads["head"], state.head_opt_state,
                                                      state.head)
        new_state = new_state.replace(head=optax.apply_updates(state.head, head_updates),
                                      head_opt_state=head_opt_state)
    new_state = new_state.with_objective_extra(
        objective.update(extra, embeddings, labels, state.step))
    metrics = {**objective.reduce(lax.psum(terms, AXIS), extra),
               "grad_norm": grad_norm, "learning_rate": schedule(state.step)}
    return new_state, metrics


def psum_replicated(grads: Any, specs: Any) -> Any:
    """The gradient tree with each replicated leaf (spec `P()`) psum'd over `AXIS`; a leaf
    sharded over it keeps its own device's gradient, already the whole batch's. `specs`: a
    PartitionSpec per leaf, or one for a whole subtree."""
    def reduce(spec: P, subtree: Any) -> Any:
        return lax.psum(subtree, AXIS) if spec == P() else subtree
    return jax.tree.map(reduce, specs, grads, is_leaf=lambda x: isinstance(x, P))


def sharded_global_norm(grads: Any, specs: Any) -> jax.Array:
    """The global L2 norm of a gradient tree whose leaves are replicated (spec P(): each device
    holds the whole leaf) or sharded over `AXIS` (each holds a slice): squares of the sharded
    leaves are psum'd, those of the replicated ones counted once."""
    def squares(spec: P, subtree: Any) -> jax.Array:
        total = sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(subtree))
        return total if spec == P() else lax.psum(total, AXIS)
    parts = jax.tree.leaves(jax.tree.map(squares, specs, grads,
                                         is_leaf=lambda x: isinstance(x, P)))
    return jnp.sqrt(sum(parts))


def make_train_step(mesh: jax.sharding.Mesh, *, state_specs: Any = P(), **step_kwargs: Any):
    """`train_step` compiled once over the mesh; the state buffers are donated. state_specs:
    the state's layout (`state.partition_specs`; all replicated by default)."""
    def per_device(state, images, labels):
        return train_step(state, images, labels, **step_kwargs)
    return parallel.shard_per_device(
        per_device, mesh, in_specs=(state_specs, P(AXIS), P(AXIS)),
        out_specs=(state_specs, P()), donate_argnums=(0,))
