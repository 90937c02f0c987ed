"""Evaluation of a trained run (or the raw-pixel baseline) the way the field reports it.

    python -m facenet_jax.evaluate --workdir DIR [--data_root FOLDER --pairs PAIRS] [--output F]
        [--fold K] [--threshold T|run] [--config.eval.KEY=VALUE ...]
    python -m facenet_jax.evaluate --workdir DIR --split train|validation|test
    python -m facenet_jax.evaluate --baseline pixels --config CONFIG [--config.KEY=VALUE ...]
        --output FILE
    python -m facenet_jax.evaluate --baseline pixels --workdir DIR     # → DIR/eval_pixels.json
    python -m facenet_jax.evaluate --workdir DIR --verification_sets FOLDER [--names lfw,...]
        [--output FILE]
    python -m facenet_jax.evaluate --workdir DIR --ijb ROOT --ijb_name IJBB|IJBC [--output FILE]

Verification on LFW-style 10-fold pairs (accuracy ± std, VAL@FAR, ROC AUC, EER), retrieval
(Recall@K, R-precision, MAP@R) and one-shot identification, written as JSON plus figures (ROC
curve, same/different distance histograms with the chosen threshold).

A single-fold pairs file, or one fold of a multi-fold file (`--fold K`, 1-based as LFW numbers
its folds), has no other folds to choose a threshold on: it is scored at a threshold chosen
elsewhere, `--threshold T` or `--threshold run` (the run's own, chosen on its validation split;
the default when only one fold is scored). `--config.eval.KEY=VALUE` changes an evaluation-only
key of the run's config for this evaluation (config.EVALUATION_ONLY_KEYS: eval.distance,
eval.flip, eval.flip_mode, eval.subtract_mean, eval.threshold_search, eval.batch_size), e.g.
davidsandberg's protocol; the output records them. With `--pairs`, retrieval and one-shot
metrics are computed on the images of the identities the pairs use (all their images in the
folder), not on the whole folder.
"""

from __future__ import annotations

import pathlib
from typing import Any

import ml_collections
import numpy as np

from facenet_jax import runfiles
from facenet_jax.cli import cli_logging
from facenet_jax.config import overrides_from_texts
from facenet_jax.eval import ijb
from facenet_jax.eval.evaluate import (RUN_SPLITS, check_output_holds_the_same_evaluation,
                                       evaluate_workdir, format_summary, run_split_eval_file)
from facenet_jax.eval.evaluators import (BASELINE_EVALUATORS, BASELINES, BENCHMARK_EVALUATORS,
                                         selected_benchmarks)


def _threshold_flag(value: str | None) -> float | str | None:
    """--threshold: None, "run", or a finite number (ValueError naming the flag otherwise)."""
    if value is None or value == "run":
        return value
    try:
        number = float(value)
    except ValueError:
        number = float("nan")
    if not np.isfinite(number):
        raise ValueError(f"--threshold {value!r}: give a number (in the run's eval.distance) "
                         "or 'run'")
    return number


def main(argv: list[str]) -> None:
    from absl import flags

    del argv
    cli_logging()
    flags_ = flags.FLAGS
    if selected_benchmarks(flags_):  # the benchmark evaluators (evaluators.py)
        _run_benchmarks(flags_)
        return
    if flags_.baseline is not None:
        if flags_.run_config:
            raise ValueError("--config.KEY=VALUE with --baseline needs --config FILE (the config "
                             "the baseline floors); the eval keys of a --workdir run are changed "
                             "by --config.eval.KEY=V without --baseline")
        config, output = baseline_inputs(flags_.baseline, flags_.config, flags_.workdir,
                                         flags_.output)
        check_output_holds_the_same_evaluation(output, None, None, baseline=flags_.baseline)
        result = BASELINE_EVALUATORS.get(flags_.baseline)(config, output)
    else:
        if flags_.workdir is None:
            raise ValueError("give --workdir DIR (a trained run) or --baseline pixels "
                             "--config CONFIG --output FILE")
        if flags_.pairs is not None and flags_.data_root is None:
            raise ValueError("--pairs needs --data_root (the image folder it names)")
        workdir = pathlib.Path(flags_.workdir)
        if flags_.run_config and not flags_.output:
            raise ValueError("--config.eval.KEY=VALUE evaluates with another protocol than the "
                             "run's: pass --output FILE (the run's own evaluation files are "
                             "kept unless you name one)")
        output = (pathlib.Path(flags_.output) if flags_.output
                  else workdir / run_split_eval_file(flags_.split))
        result = evaluate_workdir(workdir, data_root=flags_.data_root, pairs_file=flags_.pairs,
                                  output=output, threshold=_threshold_flag(flags_.threshold),
                                  fold=flags_.fold, split=flags_.split,
                                  eval_overrides=overrides_from_texts(flags_.run_config))
    print(format_summary(result))
    print(f"wrote {output}")


def baseline_inputs(baseline: str, config: ml_collections.ConfigDict | None,
                    workdir: str | None, output: str | None
                    ) -> tuple[ml_collections.ConfigDict, pathlib.Path]:
    """The config a `--baseline` floors and where it writes, as the other modes: `--workdir
    DIR` floors that run (its recorded config) → DIR/eval_<baseline>.json; `--config CONFIG`
    needs `--output FILE` (no run folder to write under; never the current directory)."""
    if (config is None) == (workdir is None):
        raise ValueError(f"--baseline {baseline} floors one run: give --workdir DIR (a trained "
                         "run, its config) or --config CONFIG with --output FILE, not "
                         f"{'both' if config is not None else 'neither'}")
    if workdir is not None:
        return (runfiles.load_run_config(workdir),
                pathlib.Path(output) if output else pathlib.Path(workdir) /
                f"eval_{baseline}.json")
    if output is None:
        raise ValueError(f"--baseline {baseline} --config CONFIG writes a JSON and two figures: "
                         f"give --output FILE (e.g. runs/NAME/eval_{baseline}.json), or "
                         "--workdir DIR instead of --config to write under that run")
    return config, pathlib.Path(output)


def split_run_config_flags(argv: list[str]) -> list[str]:
    """argv with each `--config.KEY[=VALUE]` rewritten as `--run_config=KEY[=VALUE]` when no
    `--config FILE` is given: ml_collections reads such overrides only on top of a config file,
    and here they change the --workdir run's recorded config instead."""
    if any(arg == "--config" or arg.startswith("--config=") for arg in argv):
        return argv
    return [f"--run_config={arg[len('--config.'):]}" if arg.startswith("--config.") else arg
            for arg in argv]


def _run_benchmarks(flags_: Any) -> None:
    """The selected benchmark evaluators (e.g. --verification_sets FOLDER, --ijb ROOT) on DIR's
    latest checkpoint, flip on unless --noflip (as the field evaluates them); --output when
    only one runs."""
    benchmarks = [BENCHMARK_EVALUATORS.get(name) for name in BENCHMARK_EVALUATORS.names()]
    selected = " / ".join(f"--{evaluator.flag}" for evaluator in benchmarks)
    if flags_.workdir is None:
        raise ValueError(f"{selected} need --workdir DIR (a trained run)")
    unused = [f"--{name}" for name in ("data_root", "pairs", "baseline", "fold", "threshold")
              if getattr(flags_, name) is not None]
    if unused:
        raise ValueError(f"{', '.join(unused)}: not used with {selected} (they write "
                         f"{', '.join(evaluator.writes for evaluator in benchmarks)}): "
                         "run them as a separate command")
    overrides = overrides_from_texts(flags_.run_config)
    if overrides and flags_.ijb:
        raise ValueError("--config.eval.KEY=VALUE: --ijb evaluates with its own protocol "
                         "(--flip); run it as a separate command")
    flip = flags_.flip
    if flip is None and "eval.flip" not in overrides:
        flip = True  # the field's default for these benchmarks; None: eval.flip's override
    chosen = selected_benchmarks(flags_)
    if flags_.output is not None and len(chosen) > 1:
        raise ValueError(f"--output names one file, but {len(chosen)} benchmarks run: give "
                         f"{' and '.join(f'--{evaluator.flag}' for evaluator in chosen)} "
                         "separate commands, each with its --output")
    for evaluator in chosen:
        print(evaluator.run(flags_, flip))


def define_flags() -> None:
    """The command's flags (absl): called once, by `python -m facenet_jax.evaluate`."""
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "config file (for --baseline)",
                                    lock_config=True)
    flags.DEFINE_multi_string("run_config", None, "KEY=VALUE: an evaluation-only key of the "
                              "--workdir run's config for this evaluation; given as "
                              "--config.KEY=VALUE (e.g. --config.eval.distance=angular)")
    flags.DEFINE_string("workdir", None, "trained run folder")
    flags.DEFINE_string("data_root", None, "image folder to evaluate instead of the test split")
    flags.DEFINE_string("pairs", None, "LFW-format pairs file for --data_root")
    flags.DEFINE_string("output", None, "output JSON (default DIR/eval.json, "
                        "DIR/eval_verification_sets.json, DIR/eval_<ijb>.json or, for "
                        "--baseline with --workdir, DIR/eval_pixels.json)")
    flags.DEFINE_enum("split", "test", list(RUN_SPLITS), "without --data_root: which of the "
                      "run's splits to evaluate (train: how well it separates the people it "
                      "trained on) → DIR/eval.json, eval_validation.json or eval_train.json")
    flags.DEFINE_integer("fold", None, "score only this fold (1-based) of --pairs, at a "
                         "threshold chosen elsewhere (--threshold)")
    flags.DEFINE_string("threshold", None, "score pairs at this threshold (a number in the "
                        "run's eval.distance, or 'run': the run's validation threshold) instead "
                        "of choosing one per fold on the other folds")
    flags.DEFINE_enum("baseline", None, list(BASELINES), "evaluate a baseline instead of a run")
    flags.DEFINE_string("verification_sets", None, "folder of insightface .bin sets (lfw.bin, "
                        "cfp_fp.bin, ...) → DIR/eval_verification_sets.json")
    flags.DEFINE_string("names", None, "with --verification_sets: comma-separated set names "
                        "(default: every .bin in the folder)")
    flags.DEFINE_bool("flip", None, "with --verification_sets / --ijb: add the mirror image's "
                      "embedding (default on, as the field evaluates them)")
    flags.DEFINE_string("ijb", None, "IJB root (meta/, loose_crop/) → DIR/eval_<ijb_name>.json")
    flags.DEFINE_enum("ijb_name", "IJBC", list(ijb.IJB_NAMES), "which IJB protocol --ijb holds")
    flags.DEFINE_bool("ijb_detector_score", True, "weight IJB images by their detector score "
                      "(insightface's default)")
