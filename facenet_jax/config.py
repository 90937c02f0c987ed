"""Experiment configs: loading with overrides, validation before anything compiles, provenance.

Configs are Python files whose `get_config()` returns an `ml_collections.ConfigDict`
(`experiments/default.py` holds every key). On the command line they are given as
`--config FILE --config.KEY=VALUE ...` (ml_collections' config flags).
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import math
import platform
import runpy
import subprocess
import pathlib
from collections.abc import Iterable, Mapping
from typing import Any

import ml_collections

# The schedule of a run's steps and actions: a resumed run may change them.
SCHEDULE_KEYS = ("num_steps", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints")
# How evaluations embed and score (mirror images added and how, batch size, distance, mean
# subtraction, threshold search): nothing trained depends on them, so a resumed run may change
# them too; they apply to the evaluations made after the resume (a finished run resumed with
# eval.flip=True re-does its final evaluations with flip), and `evaluate --workdir` takes them
# as --config.eval.KEY=V (apply_evaluation_overrides).
EVALUATION_ONLY_KEYS = ("eval.flip", "eval.batch_size", "eval.distance", "eval.flip_mode",
                        "eval.subtract_mean", "eval.threshold_search")
# How many processes build the batches: each batch is a pure function of (seed, step) whatever
# the count, so a resumed run may change it.
INPUT_ONLY_KEYS = ("data.workers",)
# Keys a resumed run may change; anything else must match the checkpoint's config.
RESUMABLE_KEYS = SCHEDULE_KEYS + EVALUATION_ONLY_KEYS + INPUT_ONLY_KEYS
# Counts and sizes that are meaningless below 1 (a 0 would fail only deep inside a run).
POSITIVE_INT_KEYS = SCHEDULE_KEYS + ("data.prefetch", "data.pairs.num_folds",
                                      "data.pairs.pairs_per_fold", "eval.batch_size",
                                      "model.embedding_dim")
# The uniform sampler reads P×K only as its batch size: each factor just has to be >= 1.
UNIFORM_BATCH_KEYS = ("batch.identities", "batch.images_per_identity")
PAIRS_SEED_KEY = "data.pairs.seed"
# Only this fold (1-based, as LFW numbers them) of data.split.exclude_pairs_file is excluded:
# cross-validation over the folds (facenet_jax.crossval); None: all its folds.
EXCLUDE_FOLD_KEY = "data.split.exclude_pairs_fold"
MINING_SCOPES = ("global", "local")
DTYPES = ("float32", "bfloat16")
_PROVENANCE_PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "ml-collections",
                        "numpy", "facenet_jax")


def load_config(path: str | pathlib.Path, overrides: Mapping[str, Any] | None = None
                ) -> ml_collections.ConfigDict:
    """Runs the config file's `get_config()` and applies dotted overrides {"loss.margin": 0.3}.

    `FILE:ARG` calls `get_config("ARG")`, as `--config FILE:ARG` does on the command line
    (e.g. `experiments/default.py:runlocal`, the tiny preset). Overrides go through
    ml_collections' type checks, so an unknown key or a wrong type is an error here, naming the
    key.
    """
    path, arg = _config_path_and_arg(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    get_config = runpy.run_path(str(path))["get_config"]
    config = get_config() if arg is None else get_config(arg)
    for key, value in (overrides or {}).items():
        set_dotted(config, key, value)
    return config


def _config_path_and_arg(path: str | pathlib.Path) -> tuple[pathlib.Path, str | None]:
    """"dir/file.py:arg" → (dir/file.py, "arg"); a path without ":ARG" → (path, None)."""
    text = str(path)
    stem, colon, arg = text.rpartition(":")
    if colon and stem.endswith(".py") and "/" not in arg:
        return pathlib.Path(stem), arg
    return pathlib.Path(text), None


def set_dotted(config: ml_collections.ConfigDict, key: str, value: Any) -> None:
    """Sets `a.b.c` in a ConfigDict; raises KeyError naming an unknown key."""
    *parents, leaf = key.split(".")
    node = config
    for i, part in enumerate(parents):
        if part not in node:
            raise KeyError(f"unknown config key {'.'.join(parents[:i + 1])!r} (in {key!r})")
        node = node[part]
    if leaf not in node:
        raise KeyError(f"unknown config key {key!r}; valid keys here: {sorted(node.keys())}")
    node[leaf] = value


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"loss": {"margin": 0.2}} → {"loss.margin": 0.2} (lists/tuples kept as values)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def get_dotted(tree: Any, key: str, default: Any = None) -> Any:
    """tree["a"]["b"]["c"] for key "a.b.c" (nested dicts or a ConfigDict; "" is the tree
    itself); `default` when a part is missing."""
    for part in key.split(".") if key else ():
        try:
            tree = tree[part]
        except (KeyError, TypeError, IndexError):
            return default
    return tree


def to_plain(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """A JSON-ready dict of the resolved config (tuples become lists)."""
    return json.loads(config.to_json_best_effort())


def changed_keys(saved: Mapping[str, Any], current: Mapping[str, Any],
                 allowed: Iterable[str] = RESUMABLE_KEYS) -> list[str]:
    """Dotted keys whose values differ between a recorded plain config and the current one,
    except the allowed ones. Keys are compared by their effective values (`_effective_values`);
    a key only one of them holds differs (read as None on the other side)."""
    a = _effective_values(flatten(saved))
    b = _effective_values(flatten(current))
    allowed = set(allowed)
    return sorted(k for k in a.keys() | b.keys()
                  if k not in allowed and (k not in a or k not in b or a[k] != b[k]))


def pairs_seed(config: Mapping[str, Any]) -> int:
    """The seed of a config's generated evaluation pairs: data.pairs.seed, or `seed` when it
    is unset (the pairs then follow the training seed)."""
    seed = config["data"]["pairs"].get("seed")
    return config["seed"] if seed is None else seed


def _effective_values(flat: dict[str, Any]) -> dict[str, Any]:
    """A flattened config with keys that change nothing read as one value: an unset
    data.pairs.seed as its `seed` (see pairs_seed), so unset and equal to `seed` are one
    config; the blocks of encoders other than model.name are dropped (only model.name's block
    is used); the keys the run's loss.kind does not read (`objectives.unread_keys`, e.g. the
    classification keys of a triplet run) as None."""
    # model.<block>.<field>: the blocks are the only keys three deep under model.
    unused = [k for k in flat if k.startswith("model.") and k.count(".") >= 2
              and k.split(".")[1] != flat.get("model.name")]
    for key in unused:
        del flat[key]
    if PAIRS_SEED_KEY in flat and flat[PAIRS_SEED_KEY] is None and "seed" in flat:
        flat[PAIRS_SEED_KEY] = flat["seed"]
    from facenet_jax.objectives import unread_keys  # local: the loss.kind registry
    for key in unread_keys(flat):
        flat[key] = None
    return flat


def validate_config(config: ml_collections.ConfigDict, *, num_devices: int) -> None:
    """Checks everything that can be checked before data loading or compilation.

    Raises ValueError naming the key and the fix. Dataset-dependent checks (P not above the
    number of trainable identities) happen when the data is loaded, still before compiling.
    """
    from facenet_jax import (data, features_cache, losses, models, objectives,
                             optim)  # local: import-light
    from facenet_jax.losses import memory

    data.validate_sampler(config.data.sampler)
    uniform = config.data.sampler == "uniform"
    for key in POSITIVE_INT_KEYS + (UNIFORM_BATCH_KEYS if uniform else ()):
        value = get_dotted(config, key)
        if key == "num_steps" and value == 0 and config.model.init_from is not None:
            continue  # the imported encoder evaluated as it is (e.g. crossval's step-0 row)
        if key == "num_steps" and value == 0:
            raise ValueError("config.num_steps=0 trains nothing: it evaluates an encoder as "
                             "it is, so it needs --config.model.init_from=DIR (or pass "
                             "--config.num_steps=N with N >= 1)")
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"config.{key} must be a positive integer, got {value!r}; pass "
                             f"--config.{key}=N with N >= 1")
    losses.validate_loss_args(
        margin=config.loss.margin, strategy=config.loss.strategy,
        distance=config.loss.distance, soft=config.loss.soft,
        strategy_options=dict(config.loss.options))
    validate_warmup(config.loss, config.num_steps)
    objectives.validate_objective_config(config.loss)
    models.config_kwargs(config.model)  # model.name and its block config.model.<name>
    if config.model.dtype not in DTYPES:
        raise ValueError(f"model.dtype must be one of {DTYPES}, got {config.model.dtype!r}")
    if config.model.input_norm not in models.INPUT_NORMS:
        raise ValueError(f"model.input_norm must be one of {models.INPUT_NORMS}, got "
                         f"{config.model.input_norm!r}")
    with_bn_scale = [name for name in models.ENCODERS.names()
                     if "bn_scale" in models.ENCODERS.get(name).top_level]
    if config.model.bn_scale and config.model.name not in with_bn_scale:
        raise ValueError(f"model.bn_scale=True is an option of {', '.join(with_bn_scale)} only "
                         f"(model.name is {config.model.name!r}); leave it False")
    optim.validate_optimizer_config(config.optimizer, config.num_steps)
    features_cache.validate_cached_features(config)
    validate_exclude_fold(config.data.split)
    if config.parallel.mining not in MINING_SCOPES:
        raise ValueError(f"parallel.mining must be one of {MINING_SCOPES}, "
                         f"got {config.parallel.mining!r}")
    validate_eval_config(config.eval)
    if uniform:
        validate_uniform_batch(config.batch.identities * config.batch.images_per_identity,
                               num_devices)
    else:
        validate_batch_layout(config.batch.identities, config.batch.images_per_identity,
                              num_devices)
    memory.validate_memory_config(config.loss.memory,
                                  config.batch.identities * config.batch.images_per_identity)
    if config.eval.batch_size % num_devices:
        raise ValueError(f"eval.batch_size={config.eval.batch_size} is not divisible by the "
                         f"{num_devices} devices; use a multiple of {num_devices}")


def validate_eval_config(eval_config: ml_collections.ConfigDict) -> None:
    """The evaluation protocol's keys: eval.distance (metrics.EVAL_DISTANCES), eval.flip and
    eval.subtract_mean (booleans), eval.flip_mode (metrics.FLIP_MODES), eval.threshold_search
    (metrics.THRESHOLD_SEARCHES)."""
    from facenet_jax.eval import metrics  # local: import-light

    metrics.check_eval_distance(eval_config.distance, "eval.distance")
    metrics.check_threshold_search(eval_config.threshold_search, "eval.threshold_search")
    if eval_config.flip_mode not in metrics.FLIP_MODES:
        raise ValueError(f"eval.flip_mode must be one of {metrics.FLIP_MODES}, got "
                         f"{eval_config.flip_mode!r}")
    for key in ("flip", "subtract_mean"):
        if not isinstance(eval_config[key], bool):
            raise ValueError(f"eval.{key} must be True or False, got {eval_config[key]!r}")


def apply_evaluation_overrides(config: ml_collections.ConfigDict,
                               overrides: Mapping[str, str]) -> ml_collections.ConfigDict:
    """A run's recorded config with evaluation-only keys changed: {"eval.flip": "True", ...}
    (the text of `--config.eval.KEY=V`, read as the key's type) → a validated copy. Any other
    key is refused in one line: it is the trained run's and only retraining changes it."""
    refused = [key for key in overrides if key not in EVALUATION_ONLY_KEYS]
    if refused:
        raise ValueError(f"--config.{refused[0]}: an evaluation may change only the "
                         f"evaluation-only keys ({', '.join(EVALUATION_ONLY_KEYS)}); the other "
                         "keys are the trained run's")
    config = ml_collections.ConfigDict(to_plain(config))
    for key, text in overrides.items():
        set_dotted(config, key, _typed_like(get_dotted(config, key), text, key))
    validate_eval_config(config.eval)
    return config


def overrides_from_texts(texts: Iterable[str] | None) -> dict[str, str]:
    """["eval.flip=True", ...] (`--config.eval.flip=True` given to `evaluate --workdir`) →
    {"eval.flip": "True"}; a bare key reads as "True"."""
    return dict(text.split("=", 1) if "=" in text else (text, "True") for text in texts or ())


def _typed_like(current: Any, text: str, key: str) -> Any:
    """The override text as the type of the key's current value (bool: true/false, any case)."""
    if isinstance(current, bool):
        if text.lower() not in ("true", "false"):
            raise ValueError(f"--config.{key}={text}: give True or False")
        return text.lower() == "true"
    try:
        return type(current)(text) if isinstance(current, (int, float)) else text
    except ValueError:
        raise ValueError(f"--config.{key}={text}: give a {type(current).__name__}") from None


def validate_exclude_fold(split_config: ml_collections.ConfigDict) -> None:
    """data.split.exclude_pairs_fold: None, or an integer >= 1 with an exclude_pairs_file (its
    upper bound, the file's fold count, is checked where the file is read)."""
    fold = split_config.exclude_pairs_fold
    if fold is None:
        return
    if isinstance(fold, bool) or not isinstance(fold, int) or fold < 1:
        raise ValueError(f"data.split.exclude_pairs_fold must be a fold number >= 1 (1-based, "
                         f"as LFW numbers its folds) or unset, got {fold!r}")
    if split_config.exclude_pairs_file is None:
        raise ValueError(f"data.split.exclude_pairs_fold={fold} selects a fold of "
                         "data.split.exclude_pairs_file, which is unset; set both (or run "
                         "python -m facenet_jax.crossval, which sets them per fold)")


def validate_warmup(loss_config: ml_collections.ConfigDict, num_steps: int) -> None:
    """loss.warmup_steps: an int in [0, num_steps]; > 0 needs a known loss.warmup_strategy."""
    from facenet_jax import losses

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


def validate_batch_layout(identities: int, images_per_identity: int, num_devices: int) -> None:
    """P ≥ 2, K ≥ 2 and whole identities per device (P divisible by the device count)."""
    if identities < 2:
        raise ValueError(f"batch.identities (P) = {identities}: a batch needs at least 2 "
                         "identities to have negatives; set --config.batch.identities >= 2")
    if images_per_identity < 2:
        raise ValueError(f"batch.images_per_identity (K) = {images_per_identity}: with K < 2 "
                         "no anchor has a positive; set --config.batch.images_per_identity >= 2")
    if identities % num_devices:
        lower = _multiple_below(identities, num_devices)
        raise ValueError(
            f"batch.identities (P) = {identities} is not divisible by the {num_devices} "
            f"devices; each device must hold whole identities: use P = {lower} or "
            f"{lower + num_devices}")


def validate_uniform_batch(batch_size: int, num_devices: int) -> None:
    """The uniform sampler's batch (P×K, only a size there): >= 1 and split evenly over the
    devices. No K >= 2 rule: its batches carry no identity structure anyway."""
    if batch_size < 1:
        raise ValueError(f"the uniform sampler's batch size batch.identities × "
                         f"batch.images_per_identity = {batch_size} must be >= 1")
    if batch_size % num_devices:
        lower = _multiple_below(batch_size, num_devices)
        raise ValueError(
            f"the uniform sampler's batch size batch.identities × batch.images_per_identity "
            f"= {batch_size} is not divisible by the {num_devices} devices; make the product "
            f"{lower} or {lower + num_devices} (e.g. --config.batch.images_per_identity=1 "
            f"--config.batch.identities={lower})")


def _multiple_below(value: int, divisor: int) -> int:
    """The largest positive multiple of divisor not above value (divisor itself if none)."""
    return max(divisor, value // divisor * divisor)


def provenance() -> dict[str, Any]:
    """Package versions, git commit, devices and hosts: enough to reproduce a number."""
    import jax  # local: only the CLI needs device information

    versions = {}
    for name in _PROVENANCE_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "versions": versions,
        "python": platform.python_version(),
        "git_commit": _git_commit(),
        "device_kind": jax.devices()[0].device_kind,
        "platform": jax.devices()[0].platform,
        "device_count": jax.device_count(),
        "process_count": jax.process_count(),
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _git_commit() -> str | None:
    repo = pathlib.Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def json_safe(value: Any) -> Any:
    """Non-finite floats → None, numpy scalars → Python, recursively (valid JSON)."""
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
