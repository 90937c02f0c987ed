"""Fine-tuning: a run that starts from another run's encoder (`config.model.init_from=DIR`).

DIR is a trained run folder or one written by `python -m facenet_jax.pretrained`. Its newest
checkpoint's parameters and BatchNorm statistics replace the freshly initialised ones; the
optimizer starts afresh at step 0. DIR is only read. A fine-tune that was interrupted resumes
from its own checkpoints (the train loop restores those over this state), not from DIR.
"""

from __future__ import annotations

import logging
import pathlib
from typing import Any

import jax
import ml_collections
import numpy as np
import optax

from facenet_jax import checkpoints
from facenet_jax.config import changed_keys, get_dotted, to_plain
from facenet_jax.runfiles import CONFIG_FILE, load_run_config, read_run_record
from facenet_jax.state import (TrainState, create_train_state, encoder_variables,
                               state_from_variables)

# Model keys that change what the loaded weights compute without changing their shapes: the
# fine-tuning config must agree with DIR's on them.
_SAME_MEANING_KEYS = ("input_norm",)
# Config keys outside model.* that can change an encoder's parameter shapes (inception_resnet_v1's
# last convolution follows the image size).
_SHAPE_KEYS = ("data.image_size",)


def check_init_dir(path: str | pathlib.Path) -> None:
    """ValueError unless `path` is a run folder of this layout (runfiles.check_layout) with a
    checkpoint (cheap: no arrays read), so a wrong model.init_from fails before data loading or
    compiling."""
    directory = pathlib.Path(path)
    if not (directory / CONFIG_FILE).is_file():
        raise ValueError(
            f"model.init_from={path}: no {CONFIG_FILE} there; give a run folder (a trained run, "
            "or one written by python -m facenet_jax.pretrained)")
    read_run_record(directory)
    if checkpoints.latest_step(directory) is None:
        raise ValueError(f"model.init_from={path} holds no complete checkpoint under "
                         f"{checkpoints.checkpoint_dir(directory)}")


def read_variables(path: str | pathlib.Path) -> tuple[dict[str, Any], int]:
    """({"params", "batch_stats"} of DIR's newest checkpoint as host numpy, its step)."""
    check_init_dir(path)
    step = checkpoints.latest_step(path)
    fields: dict[str, Any] = {"params": {"encoder": {}}, "batch_stats": {}}
    for key, value in checkpoints.read_arrays(path, step,
                                              fields=("params/encoder", "batch_stats")).items():
        *parents, leaf = key.split("/")
        node = fields
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = np.asarray(value)
    return encoder_variables(fields), step


def _paths(tree: Any) -> dict[str, tuple[tuple[int, ...], Any]]:
    return {jax.tree_util.keystr(k, simple=True, separator="/"): (tuple(v.shape), v.dtype)
            for k, v in jax.tree.leaves_with_path(tree)}


def structure_problems(expected: Any, loaded: Any, *, source: str) -> list[str]:
    """One line per parameter path that is missing, extra or of another shape in `loaded`
    (from `source`) compared with `expected` (arrays or shape structs); [] when they fit."""
    want, have = _paths(expected), _paths(loaded)
    problems = [f"{p}: missing in {source}" for p in sorted(want.keys() - have.keys())]
    problems += [f"{p}: in {source} but not in this config's encoder"
                 for p in sorted(have.keys() - want.keys())]
    problems += [f"{p}: shape {have[p][0]} in {source}, {want[p][0]} here"
                 for p in sorted(want.keys() & have.keys()) if want[p][0] != have[p][0]]
    return problems


def init_source(path: str | pathlib.Path) -> dict[str, Any]:
    """{"path": DIR made absolute, "step": its newest checkpoint's step}: what a fine-tune
    records in its provenance as "init_from" (check_init_dir first)."""
    return {"path": str(pathlib.Path(path).resolve()), "step": checkpoints.latest_step(path)}


def encoder_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """"KEY: SAVED there, CURRENT here" per config key that shapes an encoder (model.*, except
    model.init_from, and _SHAPE_KEYS) and differs between two plain configs. With another
    model.name, only the top-level model keys: the two encoders' blocks are not comparable."""
    keys = [k for k in changed_keys(saved, current, allowed=("model.init_from",))
            if k.startswith("model.") or k in _SHAPE_KEYS]
    if "model.name" in keys:
        keys = [k for k in keys if not k.startswith("model.") or k.count(".") == 1]
    return [f"{k}: {get_dotted(saved, k)!r} there, {get_dotted(current, k)!r} here"
            for k in keys]


def check_structure(expected: Any, loaded: Any, *, source: str, hint: str) -> None:
    """ValueError naming every `structure_problems` of `loaded` (from `source`), then `hint`
    (what to change)."""
    problems = structure_problems(expected, loaded, source=source)
    if problems:
        shown = "; ".join(problems[:12]) + (f"; ... {len(problems) - 12} more"
                                            if len(problems) > 12 else "")
        raise ValueError(
            f"the encoder in {source} does not fit the one this config builds ({shown}). "
            f"{hint}")


def _structure_hint(config: ml_collections.ConfigDict, path: str | pathlib.Path) -> str:
    """What to change when DIR's encoder does not fit: the differing keys (encoder_differences)
    of the two configs, or, when none differs, where else to look."""
    differences = encoder_differences(load_run_config(path).to_dict(), to_plain(config))
    where = pathlib.Path(path) / CONFIG_FILE
    if not differences:
        return (f"The model.* keys agree with {where}: the weights do not match what that "
                "config builds")
    return (f"The configs differ in {'; '.join(differences)}: set those keys as in {where}")


def _check_same_meaning(config: ml_collections.ConfigDict, path: str | pathlib.Path) -> None:
    saved = load_run_config(path).model
    for key in _SAME_MEANING_KEYS:
        if saved[key] != config.model[key]:
            raise ValueError(
                f"model.{key}={config.model[key]!r} but the encoder in model.init_from={path} "
                f"was trained with {saved[key]!r}; pass --config.model.{key}={saved[key]}")


def initial_state(config: ml_collections.ConfigDict, model: Any,
                  tx: optax.GradientTransformation, *, resuming: bool,
                  num_classes: int | None = None, num_shards: int = 1,
                  shapes: TrainState | None = None) -> TrainState:
    """The train state a run starts from (on the host): `create_train_state`, or, with
    `config.model.init_from` on a fresh start, a step-0 state holding DIR's encoder and a
    fresh optimizer (and a fresh objective head: num_classes, num_shards as in
    `create_train_state`). When `resuming`, DIR is not read: the run's own checkpoint wins.
    shapes: `create_train_state`'s shapes (jax.eval_shape) when the caller has them; else
    they are traced here."""
    sizes = dict(num_classes=num_classes, num_shards=num_shards)
    source = config.model.init_from
    if source is None or resuming:
        return create_train_state(config, model, tx, **sizes)
    check_init_dir(source)
    _check_same_meaning(config, source)
    expected = (shapes if shapes is not None
                else jax.eval_shape(lambda: create_train_state(config, model, tx, **sizes)))
    variables, step = read_variables(source)
    check_structure(expected.variables, variables, source=f"model.init_from={source}",
                    hint=_structure_hint(config, source))
    logging.info("initialised from %s (step %d)", pathlib.Path(source).resolve(), step)
    variables = jax.tree.map(lambda v, e: np.asarray(v, dtype=e.dtype), variables,
                             expected.variables)
    with jax.default_device(jax.local_devices(backend="cpu")[0]):
        return state_from_variables(config, variables, tx, **sizes)
