"""The train state and how it is built from a config (shared by training and inference)."""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import AbstractMesh, AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from facenet_jax import models, objectives, optim
from facenet_jax.parallel import AXIS


@flax.struct.dataclass
class TrainState:
    """Everything a checkpoint holds. `step` counts completed updates.

    params: {"encoder": the encoder's parameters, "head": the objective's own parameters
    (e.g. class centres, laid out over the mesh by its `param_specs`; {} for none)}, trained
    by one optimizer whose state is `opt_state`. `extra`: the objective's non-trained state
    (a cross-batch memory; {} for none), replicated. `rng` is the run's base key; the key of
    step s is `fold_in(rng, s)`, so a resumed run draws exactly what an uninterrupted one would.
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    extra: Any
    rng: jax.Array

    @property
    def variables(self) -> dict[str, Any]:
        """The encoder's {"params", "batch_stats"}: what evaluation and embed apply."""
        return {"params": self.params["encoder"], "batch_stats": self.batch_stats}


def encoder_fields(variables: dict[str, Any]) -> dict[str, Any]:
    """An encoder's variables {"params", "batch_stats"} placed where the train state (and so a
    checkpoint) holds them: a partial state tree, e.g. the target of
    `checkpoints.restore_latest(..., partial=True)` that reads the encoder alone."""
    return {"params": {"encoder": variables["params"]},
            "batch_stats": variables.get("batch_stats", {})}


def encoder_variables(fields: dict[str, Any]) -> dict[str, Any]:
    """The inverse of `encoder_fields`: {"params", "batch_stats"} of a partial state tree."""
    return {"params": fields["params"]["encoder"], "batch_stats": fields.get("batch_stats", {})}


def build_model(config: ml_collections.ConfigDict, *, bn_axis_name: str | None):
    """The encoder named by `config.model`, with global-batch BN over `bn_axis_name`; its own
    fields come from the block `config.model.<name>` (models.config_kwargs)."""
    return models.create_model(
        config.model.name, embedding_dim=config.model.embedding_dim,
        dtype=jnp.dtype(config.model.dtype), bn_axis_name=bn_axis_name,
        input_norm=config.model.input_norm, **models.config_kwargs(config.model))


def build_optimizer(config: ml_collections.ConfigDict
                    ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optimizer of the train params {"encoder", "head"} (optim.make_optimizer: clipped
    by their joint global norm) and the schedule."""
    return (optim.make_optimizer(config.optimizer, config.num_steps),
            optim.make_schedule(config.optimizer, config.num_steps))


def create_train_state(config: ml_collections.ConfigDict, model: Any,
                       tx: optax.GradientTransformation, *, num_classes: int | None = None,
                       num_shards: int = 1) -> TrainState:
    """Initialises parameters from `config.seed` (identical on every process), on the host.
    num_classes: the training split's identities, num_shards: the mesh size (objectives with
    class centres, split over the mesh, need both)."""
    size = config.data.image_size
    init_key, _ = _keys(config)

    @jax.jit
    def init() -> TrainState:
        variables = model.init(init_key, jnp.zeros((2, size, size, 3), jnp.float32),
                               train=False)
        return state_from_variables(config, variables, tx, num_classes=num_classes,
                                    num_shards=num_shards)

    with jax.default_device(jax.local_devices(backend="cpu")[0]):
        return init()


# Folded into the parameter initialisation key for the objective's parameters: the encoder's
# initialisation stays what it was.
_HEAD_INIT_STREAM = 0x4EAD


def _keys(config: ml_collections.ConfigDict) -> tuple[jax.Array, jax.Array]:
    """(parameter initialisation key, the run's base key), both from `config.seed`."""
    init_key, run_key = jax.random.split(jax.random.PRNGKey(config.seed))
    return init_key, run_key


def state_from_variables(config: ml_collections.ConfigDict, variables: Any,
                         tx: optax.GradientTransformation, *, num_classes: int | None = None,
                         num_shards: int = 1) -> TrainState:
    """A step-0 train state holding given encoder variables ({"params", "batch_stats"}), the
    objective's own parameters (initialised from `config.seed`; {} for none), a fresh
    optimizer over both, and the objective's initial non-trained state (with
    `loss.memory.size` > 0, an empty cross-batch memory): what `create_train_state` builds,
    and what a run starting from imported or fine-tuned weights starts from without
    initialising (and compiling the initialisation of) the encoder."""
    objective = objectives.from_config(config, num_classes=num_classes, num_shards=num_shards)
    head_key = jax.random.fold_in(_keys(config)[0], _HEAD_INIT_STREAM)
    params = {"encoder": variables["params"],
              "head": objective.init(head_key, config.model.embedding_dim)}
    extra = objective.init_extra(config.model.embedding_dim)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params),
                      extra={} if extra is None else extra, rng=_keys(config)[1])


def partition_specs(state: TrainState, objective: objectives.Objective,
                    tx: optax.GradientTransformation) -> TrainState:
    """A PartitionSpec tree (a prefix of `state`) of where each leaf lives on the mesh:
    everything replicated but the objective's parameters (its `param_specs`, e.g. centres
    split along the classes) and their copies in the optimizer state (momenta, accumulators).

    The latter follow their parameters by JAX's explicit sharding types: `tx.init` traced
    (shapes only) on parameters typed with their specs carries each spec to the state leaves
    derived from them. jit's propagation does not do it (the optimizer state is initialised
    from constants: `jax.jit(tx.init)` of sharded parameters returned every leaf on one
    device, jax 0.10), nor does `optax.tree_map_params` (it cannot call the label function of
    `backbone_lr_multiplier`'s multi_transform)."""
    param_specs = {"encoder": jax.tree.map(lambda _: P(), state.params["encoder"]),
                   "head": objective.param_specs()}
    with jax.sharding.use_abstract_mesh(_LAYOUT_MESH):
        typed = jax.tree.map(
            lambda spec, x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                 sharding=NamedSharding(_LAYOUT_MESH, spec)),
            param_specs, state.params, is_leaf=lambda x: isinstance(x, P))
        opt_state = jax.eval_shape(tx.init, typed)
    opt_specs = jax.tree.map(lambda x: P() if x.sharding is None else x.sharding.spec,
                             opt_state)
    return TrainState(step=P(), params=param_specs, batch_stats=P(), opt_state=opt_specs,
                      extra=P(), rng=P())


# A one-device mesh with explicit axis types on which `partition_specs` traces `tx.init`: its
# size does not matter, only that a leaf's spec is part of its type.
_LAYOUT_MESH = AbstractMesh((1,), (AXIS,), axis_types=(AxisType.Explicit,))
