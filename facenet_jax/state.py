"""The train state and how it is built from a config (shared by training and inference)."""

from __future__ import annotations

import dataclasses
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import PartitionSpec as P

from facenet_jax import models, objectives, optim


@flax.struct.dataclass
class TrainState:
    """Everything a checkpoint holds. `step` counts completed updates.

    `rng` is the run's base key; the key of step s is `fold_in(rng, s)`, so a resumed run draws
    exactly what an uninterrupted one would.
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array

    @property
    def variables(self) -> dict[str, Any]:
        return {"params": self.params, "batch_stats": self.batch_stats}

    # What the step hands its objective (objectives/base.py): its parameters and its
    # non-trained state. A state without either field has none of them.
    @property
    def objective_params(self) -> Any:
        return {}

    @property
    def objective_extra(self) -> Any:
        return None

    def with_objective_extra(self, extra: Any) -> "TrainState":
        return self


@flax.struct.dataclass
class MemoryTrainState(TrainState):
    """The train state of a run with a cross-batch memory (config.loss.memory.size > 0):
    `memory` is a `losses.memory.CrossBatchMemory`, checkpointed with the rest. A separate
    class, so a run without memory keeps exactly the old state tree (orbax restores only into
    the tree a checkpoint was saved from)."""

    memory: Any

    @property
    def objective_extra(self) -> Any:
        return self.memory

    def with_objective_extra(self, extra: Any) -> "MemoryTrainState":
        return self.replace(memory=extra)


@flax.struct.dataclass
class HeadTrainState(TrainState):
    """The train state of an objective with parameters of its own (e.g. class centres,
    objectives/classification.py): `head` holds them, laid out over the mesh by the
    objective's `param_specs`, and `head_opt_state` their optimizer state (the encoder's stays
    in `opt_state`, so runs without a head keep the old state tree)."""

    head: Any
    head_opt_state: Any

    @property
    def objective_params(self) -> Any:
        return self.head


def build_model(config: ml_collections.ConfigDict, *, bn_axis_name: str | None):
    """The encoder named by `config.model`, with global-batch BN over `bn_axis_name`; its own
    fields come from the block `config.model.<name>` (models.config_kwargs)."""
    return models.create_model(
        config.model.name, embedding_dim=config.model.embedding_dim,
        dtype=jnp.dtype(config.model.dtype), bn_axis_name=bn_axis_name,
        input_norm=config.model.input_norm, **models.config_kwargs(config.model))


def build_optimizer(config: ml_collections.ConfigDict
                    ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The encoder's optimizer and the schedule. With an objective that has parameters the
    step clips the whole tree jointly (some of it is sharded), so this one does not clip."""
    clip = not objectives.has_parameters(config)
    return (optim.make_optimizer(config.optimizer, config.num_steps, clip=clip),
            optim.make_schedule(config.optimizer, config.num_steps))


def build_head_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """The optimizer of the objective's own parameters: the encoder's settings at the base
    learning rate, without clipping (the step clips jointly)."""
    return optim.make_optimizer(config.optimizer, config.num_steps, clip=False,
                                backbone_multiplier=False)


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
    """A step-0 train state holding given encoder variables ({"params", "batch_stats"}), a
    fresh optimizer, the objective's own parameters (initialised from `config.seed`) and its
    initial non-trained state (with `loss.memory.size` > 0, an empty cross-batch memory): what
    `create_train_state` builds, and what a run starting from imported or fine-tuned weights
    starts from without initialising (and compiling the initialisation of) the encoder."""
    params = variables["params"]
    fields = dict(step=jnp.zeros((), jnp.int32), params=params,
                  batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params),
                  rng=_keys(config)[1])
    objective = objectives.from_config(config, num_classes=num_classes, num_shards=num_shards)
    if objectives.has_parameters(config):
        head = objective.init(jax.random.fold_in(_keys(config)[0], _HEAD_INIT_STREAM),
                              config.model.embedding_dim)
        return HeadTrainState(**fields, head=head,
                              head_opt_state=build_head_optimizer(config).init(head))
    extra = objective.init_extra(config.model.embedding_dim)
    if extra is None:
        return TrainState(**fields)
    return MemoryTrainState(**fields, memory=extra)


def partition_specs(state: TrainState, objective: objectives.Objective,
                    head_tx: optax.GradientTransformation | None = None) -> Any:
    """A PartitionSpec tree (a prefix of `state`) for the step's shard_map: everything
    replicated but a head state's parameters (the objective's `param_specs`) and their copies
    in its optimizer state (`head_tx`'s, e.g. momentum)."""
    if not isinstance(state, HeadTrainState):
        return P()
    specs = objective.param_specs()
    opt_specs = optax.tree_map_params(
        head_tx, lambda _, spec: spec, state.head_opt_state, specs,
        transform_non_params=lambda _: P(), is_leaf=lambda x: isinstance(x, P))
    replicated = {field.name: P() for field in dataclasses.fields(TrainState)}
    return HeadTrainState(**replicated, head=specs, head_opt_state=opt_specs)
