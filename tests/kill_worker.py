"""The train CLI, unchanged, killed by SIGKILL right after step S (its checkpoint included).

    python tests/kill_worker.py S --config CONFIG --workdir DIR [--config.K=V ...]

Runs `python -m facenet_jax.train` in this process (same flags, same code path) with
`train_and_evaluate(..., after_step=...)` set to SIGKILL the process once step S and its
actions are done: a crash at an exact point, for the resume tests.
"""

from __future__ import annotations

import functools
import os
import pathlib
import runpy
import signal
import sys

# This checkout's package, as `python -m facenet_jax.train` run from the repository finds it.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))


def kill_after(step: int, done: int) -> None:
    if done == step:
        os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    step = int(sys.argv[1])
    from facenet_jax.train import loop  # the CLI imports train_and_evaluate from here

    loop.train_and_evaluate = functools.partial(loop.train_and_evaluate,
                                                after_step=functools.partial(kill_after, step))
    sys.argv = ["facenet_jax.train", *sys.argv[2:]]
    runpy.run_module("facenet_jax.train", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
