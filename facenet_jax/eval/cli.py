"""Evaluation of a trained run (or the raw-pixel baseline) the way the field reports it.

    python -m facenet_jax.evaluate --workdir DIR [--data_root FOLDER --pairs PAIRS] [--output F]
        [--fold K] [--threshold T|run] [--config.eval.KEY=VALUE ...]
    python -m facenet_jax.evaluate --workdir DIR --split train|validation|test
    python -m facenet_jax.evaluate --workdir DIR --evaluators all|validation,test
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

`--evaluators all` (or some of validation,test) is an evaluation-only run of the evaluations
the end of training runs (eval.evaluators.load_and_eval): the same entries on the latest
checkpoint, writing eval_validation.json, eval.json and the test/... rows as training does.
"""

from __future__ import annotations

from facenet_jax.cli import cli_logging
from facenet_jax.eval import ijb
from facenet_jax.eval.evaluate import RUN_SPLITS
from facenet_jax.eval.evaluators import BASELINES, select_from_flags


def main(argv: list[str]) -> None:
    """Runs the evaluator entries the flags select (eval.evaluators.select_from_flags, which
    refuses flags they do not read), printing what each reports."""
    from absl import flags

    del argv
    cli_logging()
    for _, evaluator in select_from_flags(flags.FLAGS):
        print(evaluator.run_flags(flags.FLAGS))


def split_run_config_flags(argv: list[str]) -> list[str]:
    """argv with each `--config.KEY[=VALUE]` rewritten as `--run_config=KEY[=VALUE]` when no
    `--config FILE` is given: ml_collections reads such overrides only on top of a config file,
    and here they change the --workdir run's recorded config instead."""
    if any(arg == "--config" or arg.startswith("--config=") for arg in argv):
        return argv
    return [f"--run_config={arg[len('--config.'):]}" if arg.startswith("--config.") else arg
            for arg in argv]


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
    flags.DEFINE_string("evaluators", None, "an evaluation-only run: 'all' or some of "
                        "validation,test: the evaluations the end of training runs, on DIR's "
                        "latest checkpoint, written as training writes them (eval_validation.json, "
                        "eval.json, test/... rows)")
    flags.DEFINE_bool("ijb_detector_score", True, "weight IJB images by their detector score "
                      "(insightface's default)")
