"""The tests' tiny runs: experiments/default.py:runlocal in process or through the train CLI.

    from tiny import RUNLOCAL, RUNLOCAL_OVERRIDES, cli_env, tiny_config, train_cli, xla_flags
"""

from __future__ import annotations

import os
import pathlib
import runpy
import subprocess
import sys
from collections.abc import Mapping
from typing import Any

REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT = REPO / "experiments" / "default.py"
RUNLOCAL = f"{DEFAULT}:runlocal"  # `--config` value and load_config path of the tiny preset
# The preset as dotted overrides of experiments/default.py, for what takes a plain config file
# and overrides (a sweep's `common`).
RUNLOCAL_OVERRIDES: dict[str, Any] = runpy.run_path(str(DEFAULT))["RUNLOCAL"]


def tiny_config(overrides: Mapping[str, Any] | None = None, /, **dotted: Any):
    """The runlocal preset with dotted overrides: tiny_config({"loss.margin": 0.3}) or
    tiny_config(num_steps=2)."""
    from facenet_jax import config as cfg

    return cfg.load_config(RUNLOCAL, {**(overrides or {}), **dotted})


def xla_flags(devices: int) -> str:
    """XLA_FLAGS for a subprocess on `devices` CPU devices, keeping this session's other flags
    (conftest's compile-time ones: a process without them compiles slower and shares no
    compilation-cache entry with the session)."""
    from facenet_jax.parallel import host_device_flags

    return host_device_flags(os.environ.get("XLA_FLAGS", ""), devices)


def cli_env(devices: int = 1, **extra: str) -> dict[str, str]:
    """The environment of a CLI subprocess: this one's (the compilation cache included) on
    `devices` CPU devices, with most XLA optimisations off as conftest sets them (flax's
    train_test pattern: these runs are a few steps, compiling dominates), plus `extra`."""
    return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags(devices), **extra}


def train_cli(workdir: str | pathlib.Path, *flags: str, env: Mapping[str, str] | None = None,
              check: bool = True, timeout: float = 240,
              program: tuple[str, ...] = ("-m", "facenet_jax.train")
              ) -> subprocess.CompletedProcess:
    """`python -m facenet_jax.train --config experiments/default.py:runlocal --workdir W FLAGS`
    (program: e.g. (tests/kill_worker.py, S) instead of -m facenet_jax.train)."""
    cmd = [sys.executable, *program, "--config", RUNLOCAL, "--workdir", str(workdir), *flags]
    result = subprocess.run(cmd, cwd=REPO, env=dict(env or cli_env()), capture_output=True,
                            text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"train failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result
