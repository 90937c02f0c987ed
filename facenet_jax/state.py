"""The train state and how it is built from a config (shared by training and inference)."""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

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


def build_model(config: ml_collections.ConfigDict, *, bn_axis_name: str | None):
    """The encoder named by `config.model`, with global-batch BN over `bn_axis_name`; its own
    fields come from the block `config.model.<name>` (models.config_kwargs)."""
    return models.create_model(
        config.model.name, embedding_dim=config.model.embedding_dim,
        dtype=jnp.dtype(config.model.dtype), bn_axis_name=bn_axis_name,
        input_norm=config.model.input_norm, **models.config_kwargs(config.model))


def build_optimizer(config: ml_collections.ConfigDict
                    ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    return (optim.make_optimizer(config.optimizer, config.num_steps),
            optim.make_schedule(config.optimizer, config.num_steps))


def create_train_state(config: ml_collections.ConfigDict, model: Any,
                       tx: optax.GradientTransformation) -> TrainState:
    """Initialises parameters from `config.seed` (identical on every process), on the host."""
    size = config.data.image_size
    init_key, _ = _keys(config)

    @jax.jit
    def init() -> TrainState:
        variables = model.init(init_key, jnp.zeros((2, size, size, 3), jnp.float32),
                               train=False)
        return state_from_variables(config, variables, tx)

    with jax.default_device(jax.local_devices(backend="cpu")[0]):
        return init()


def _keys(config: ml_collections.ConfigDict) -> tuple[jax.Array, jax.Array]:
    """(parameter initialisation key, the run's base key), both from `config.seed`."""
    init_key, run_key = jax.random.split(jax.random.PRNGKey(config.seed))
    return init_key, run_key


def state_from_variables(config: ml_collections.ConfigDict, variables: Any,
                         tx: optax.GradientTransformation) -> TrainState:
    """A step-0 train state holding given encoder variables ({"params", "batch_stats"}), a
    fresh optimizer and the objective's initial non-trained state (with `loss.memory.size` > 0,
    an empty cross-batch memory): what
    `create_train_state` builds, and what a run starting from imported or fine-tuned weights
    starts from without initialising (and compiling the initialisation of) parameters."""
    params = variables["params"]
    fields = dict(step=jnp.zeros((), jnp.int32), params=params,
                  batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params),
                  rng=_keys(config)[1])
    extra = objectives.from_config(config).init_extra(config.model.embedding_dim)
    if extra is None:
        return TrainState(**fields)
    return MemoryTrainState(**fields, memory=extra)
