"""Experiment configs: loading with overrides, comparing and recording them (provenance).

Configs are Python files whose `get_config()` returns an `ml_collections.ConfigDict`
(`experiments/default.py` holds every key). On the command line they are given as
`--config FILE --config.KEY=VALUE ...` (ml_collections' config flags).

No key's value is checked here: each component validates its own sub-config
(`models.validate_model_config`, `data.validate_data_config`, ...) and
`facenet_jax.train.validate.validate_run_config` runs them all, with the checks that span
components, before a run touches its folder. This module imports no other facenet_jax module.
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
PAIRS_SEED_KEY = "data.pairs.seed"
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


def apply_evaluation_overrides(config: ml_collections.ConfigDict,
                               overrides: Mapping[str, str]) -> ml_collections.ConfigDict:
    """A run's recorded config with evaluation-only keys changed: {"eval.flip": "True", ...}
    (the text of `--config.eval.KEY=V`, read as the key's type) → a copy. Any other key is
    refused in one line: it is the trained run's and only retraining changes it. The values'
    meaning is the evaluation's to check (`metrics.validate_eval_config`, which `load_encoder`
    runs on the copy)."""
    refused = [key for key in overrides if key not in EVALUATION_ONLY_KEYS]
    if refused:
        raise ValueError(f"--config.{refused[0]}: an evaluation may change only the "
                         f"evaluation-only keys ({', '.join(EVALUATION_ONLY_KEYS)}); the other "
                         "keys are the trained run's")
    config = ml_collections.ConfigDict(to_plain(config))
    for key, text in overrides.items():
        set_dotted(config, key, _typed_like(get_dotted(config, key), text, key))
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
