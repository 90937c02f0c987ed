"""The training CLI.

    python -m facenet_jax.train --config experiments/default.py --workdir DIR [--config.K=V ...]

Re-running the same command on the same DIR resumes from its latest checkpoint.
"""

from __future__ import annotations

import json
import pathlib

from absl import flags
from ml_collections import config_flags

from facenet_jax import cli, runfiles
from facenet_jax.eval.evaluate import format_summary
from facenet_jax.train.loop import train_and_evaluate


def main(argv: list[str]) -> None:
    del argv
    cli.cli_logging()
    flags_ = flags.FLAGS
    result = train_and_evaluate(flags_.config, flags_.workdir)
    if result.get("preempted"):
        return
    validation = pathlib.Path(flags_.workdir) / runfiles.VALIDATION_EVAL_FILE
    if validation.exists():
        print(f"validation split ({validation}):\n"
              f"{format_summary(json.loads(validation.read_text()))}", flush=True)
    print(f"test split ({pathlib.Path(flags_.workdir) / runfiles.EVAL_FILE}):\n"
          f"{format_summary(result)}", flush=True)


if __name__ == "__main__":
    config_flags.DEFINE_config_file("config", None, "experiment config file", lock_config=True)
    flags.DEFINE_string("workdir", None, "run folder (created; re-use to resume)")
    flags.mark_flags_as_required(["config", "workdir"])
    cli.run(main)
