"""One-line errors for config values, shared by the validators each component keeps for its own
sub-config (`models.validate_model_config`, `data.validate_data_config`,
`metrics.validate_eval_config`, ...; `train.validate.validate_run_config` runs them all). Pure:
imports no other facenet_jax module."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def check_positive_int(value: Any, key: str) -> None:
    """ValueError unless `value` (config key `key`, e.g. "data.prefetch") is an integer >= 1:
    counts and sizes that are meaningless below 1, where a 0 would fail only deep in a run."""
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"config.{key} must be a positive integer, got {value!r}; pass "
                         f"--config.{key}=N with N >= 1")


def check_one_of(value: Any, choices: Sequence[Any], key: str) -> None:
    """ValueError unless `value` (config key `key`) is one of `choices`."""
    if value not in choices:
        raise ValueError(f"{key} must be one of {tuple(choices)}, got {value!r}")
