"""A run's config checked before its folder is touched, any data is read or anything compiles.

Each component validates its own sub-config (`data.validate_data_config`,
`models.validate_model_config`, `metrics.validate_eval_config`, `losses.validate_loss_args`,
`objectives.validate_objective_config`, `optim.validate_optimizer_config`,
`features_cache.validate_cached_features`, `losses.memory.validate_memory_config`); this module
runs them all and owns what spans components: the run's schedule, the loss's warm-up against
num_steps, the batch against the device count, the mining scope, the evaluation batch against
the device count. Dataset-dependent checks (P not above the number of trainable identities)
happen when the data is loaded, still before compiling.
"""

from __future__ import annotations

import ml_collections

from facenet_jax import data, features_cache, losses, models, objectives, optim
from facenet_jax.eval import metrics
from facenet_jax.checks import check_one_of, check_positive_int
from facenet_jax.config import SCHEDULE_KEYS, get_dotted
from facenet_jax.losses import memory

# The uniform sampler reads P×K only as its batch size: each factor just has to be >= 1.
UNIFORM_BATCH_KEYS = ("batch.identities", "batch.images_per_identity")


def validate_run_config(config: ml_collections.ConfigDict, *, num_devices: int) -> None:
    """Checks everything about `config` that can be checked before data loading or
    compilation, for a mesh of `num_devices`. Raises ValueError naming the key and the fix."""
    data.validate_data_config(config.data)
    uniform = config.data.sampler == "uniform"
    validate_schedule(config)
    for key in UNIFORM_BATCH_KEYS if uniform else ():
        check_positive_int(get_dotted(config, key), key)
    metrics.validate_eval_config(config.eval)
    models.validate_model_config(config.model)
    losses.validate_loss_args(
        margin=config.loss.margin, strategy=config.loss.strategy,
        distance=config.loss.distance, soft=config.loss.soft,
        strategy_options=dict(config.loss.options))
    validate_warmup(config.loss, config.num_steps)
    objectives.validate_objective_config(config.loss)
    optim.validate_optimizer_config(config.optimizer, config.num_steps)
    features_cache.validate_cached_features(config)
    check_one_of(config.parallel.mining, objectives.MINING_SCOPES, "parallel.mining")
    global_batch = config.batch.identities * config.batch.images_per_identity
    if uniform:
        data.validate_uniform_batch(global_batch, num_devices)
    else:
        data.validate_batch_layout(config.batch.identities, config.batch.images_per_identity,
                                   num_devices)
    memory.validate_memory_config(config.loss.memory, global_batch)
    if config.eval.batch_size % num_devices:
        raise ValueError(f"eval.batch_size={config.eval.batch_size} is not divisible by the "
                         f"{num_devices} devices; use a multiple of {num_devices}")


def validate_schedule(config: ml_collections.ConfigDict) -> None:
    """The run's schedule (num_steps, log_every, eval_every, checkpoint_every,
    keep_checkpoints): integers >= 1, except num_steps=0 with model.init_from (the imported
    encoder evaluated as it is, e.g. crossval's step-0 row)."""
    for key in SCHEDULE_KEYS:
        value = get_dotted(config, key)
        if key == "num_steps" and value == 0 and config.model.init_from is not None:
            continue
        if key == "num_steps" and value == 0:
            raise ValueError("config.num_steps=0 trains nothing: it evaluates an encoder as "
                             "it is, so it needs --config.model.init_from=DIR (or pass "
                             "--config.num_steps=N with N >= 1)")
        check_positive_int(value, key)


def validate_warmup(loss_config: ml_collections.ConfigDict, num_steps: int) -> None:
    """loss.warmup_steps: an int in [0, num_steps]; > 0 needs a known loss.warmup_strategy."""
    steps = loss_config.warmup_steps
    strategy = loss_config.warmup_strategy
    if isinstance(steps, bool) or not isinstance(steps, int) or not 0 <= steps <= num_steps:
        raise ValueError(f"loss.warmup_steps must be an integer in [0, num_steps={num_steps}], "
                         f"got {steps!r}")
    if steps and strategy not in losses.MINING_STRATEGIES:
        raise ValueError(f"loss.warmup_steps={steps} needs loss.warmup_strategy, one of "
                         f"{', '.join(losses.MINING_STRATEGIES.names())}; got {strategy!r}")
    if strategy is not None and not steps:
        raise ValueError(f"loss.warmup_strategy={strategy!r} has no effect with "
                         "loss.warmup_steps=0; set --config.loss.warmup_steps=N")
