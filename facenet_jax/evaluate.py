"""Evaluation of a trained run (or the raw-pixel baseline) the way the field reports it.

    python -m facenet_jax.evaluate --workdir DIR [--data_root FOLDER --pairs PAIRS] [--output F]
    python -m facenet_jax.evaluate --baseline pixels --config CONFIG [--config.KEY=VALUE ...]
    python -m facenet_jax.evaluate --workdir DIR --verification_sets FOLDER [--names lfw,...]
    python -m facenet_jax.evaluate --workdir DIR --ijb ROOT --ijb_name IJBB|IJBC

Verification on LFW-style 10-fold pairs (accuracy ± std, VAL@FAR, ROC AUC, EER), retrieval
(Recall@K, R-precision, MAP@R) and one-shot identification, written as JSON plus figures (ROC
curve, same/different distance histograms with the chosen threshold).
"""

from __future__ import annotations

import json
import logging
import pathlib
import warnings
from collections.abc import Callable
from typing import Any

import ml_collections
import numpy as np

from facenet_jax import data, ijb, metrics, plots, runfiles, verification_sets
from facenet_jax.config import json_safe, pairs_seed, provenance, to_plain
from facenet_jax.data.alignment import alignment_mismatch
from facenet_jax.logs import cli_logging

EVAL_FILE = "eval.json"
SPLIT_FILE = "split.json"  # written by the train CLI: each split's identity names
BASELINES = ("pixels",)


def evaluate_dataset(embed: Callable[[Any, np.ndarray], np.ndarray], variables: Any,
                     dataset: data.Dataset, pairs: data.Pairs, *, distance: str
                     ) -> dict[str, Any]:
    """Embeds every image of `dataset` once and computes all metrics on it and its pairs."""
    embeddings = embed(variables, dataset.images)
    return evaluate_embedded(embeddings, dataset.labels, pairs, distance=distance)


def evaluate_embedded(embeddings: np.ndarray, labels: np.ndarray, pairs: data.Pairs, *,
                      distance: str) -> dict[str, Any]:
    """All metrics from embeddings [N,D] and integer labels [N] (pairs index into them)."""
    return metrics.evaluate_embeddings(embeddings, labels, pairs.first, pairs.second,
                                       pairs.is_same, pairs.fold, distance=distance)


def pixel_embeddings(images: np.ndarray) -> np.ndarray:
    """The raw-pixel baseline: uint8 [N,H,W,3] → [0,1], flattened, L2-normalised [N, H*W*3]."""
    flat = images.reshape(len(images), -1).astype(np.float32) / 255.0
    return flat / np.maximum(np.linalg.norm(flat, axis=1, keepdims=True), 1e-12)


def test_split_and_pairs(config: ml_collections.ConfigDict,
                         split_record: pathlib.Path | None = None
                         ) -> tuple[data.Dataset, data.Pairs]:
    """The test split of a config's data and its generated pairs (deterministic from seeds).

    `split_record`: a run's split.json; the split recomputed from the data must match it.
    """
    splits = data.split_dataset(data.load_dataset(config.data), config.data)
    if split_record is not None:
        data.check_split_record(split_record, splits)
    test = splits["test"]
    return test, generated_pairs(config, test)


def generated_pairs(config: ml_collections.ConfigDict, dataset: data.Dataset) -> data.Pairs:
    if dataset.num_identities < 2:
        raise ValueError(
            f"the evaluation split has {dataset.num_identities} identities; pairs need at "
            "least 2: raise data.split.test (or validation)")
    return data.generate_pairs(dataset, num_folds=config.data.pairs.num_folds,
                               pairs_per_fold=config.data.pairs.pairs_per_fold,
                               seed=pairs_seed(config))


def write_evaluation(result: dict[str, Any], output: pathlib.Path, *,
                     distances: np.ndarray, is_same: np.ndarray) -> dict[str, Any]:
    """Writes the JSON (atomically) and the ROC and histogram figures beside it."""
    output.parent.mkdir(parents=True, exist_ok=True)
    stem = output.with_suffix("")
    far, tar, _ = metrics.roc_curve(distances, is_same)
    result["figures"] = {
        "roc": str(plots.plot_roc(far, tar, f"{stem}_roc.png", auc=result["auc"],
                                  eer=result["eer"], log_far=True,
                                  far_min=min(1e-4, far[far > 0].min()),
                                  points=val_operating_points(result))),
        "histogram": str(plots.plot_distance_histogram(
            distances, is_same, result["threshold"], f"{stem}_distances.png")),
    }
    # Per-writer temporary file: two sweep aggregations may compute one pixel baseline at once.
    runfiles.atomic_write_json(output, json_safe(result))
    return result


def val_operating_points(result: dict[str, Any]) -> dict[str, tuple[float, float]]:
    """{"VAL@FAR=1e-3": (held-out FAR, VAL), ...} for the ROC figure (FAR > 0 only: a log
    axis cannot show 0)."""
    return {f"VAL@FAR={name}": (result[f"far@far={name}"], result[f"val@far={name}"])
            for name in metrics.VAL_FAR_TARGETS if (result.get(f"far@far={name}") or 0) > 0}


def _finish(result: dict[str, Any], embeddings: np.ndarray, pairs: data.Pairs,
            config: ml_collections.ConfigDict, output: pathlib.Path | None, *,
            distance: str, extra: dict[str, Any]) -> dict[str, Any]:
    result = {**result, **extra, "distance": distance, "config": to_plain(config),
              "provenance": provenance()}
    if output is None:
        return result
    distances = metrics.pair_distances(embeddings, pairs.first, pairs.second, distance)
    return write_evaluation(result, output, distances=distances, is_same=pairs.is_same)


def evaluate_run_test_split(config: ml_collections.ConfigDict, workdir: pathlib.Path,
                            embed: Callable, variables: Any, test: data.Dataset, *, step: int,
                            write: bool = True) -> dict[str, Any]:
    """End-of-training evaluation on the run's test split → DIR/eval.json (+ figures)."""
    pairs = generated_pairs(config, test)
    embeddings = embed(variables, test.images)
    result = evaluate_embedded(embeddings, test.labels, pairs, distance=config.eval.distance)
    return _finish(result, embeddings, pairs, config, workdir / EVAL_FILE if write else None,
                   distance=config.eval.distance,
                   extra={"step": step, "split": "test", "model": config.model.name})


def evaluate_pixels(config: ml_collections.ConfigDict, output: pathlib.Path | None
                    ) -> dict[str, Any]:
    """The raw-pixel floor on exactly the pairs and images the config's run is evaluated on."""
    test, pairs = test_split_and_pairs(config)
    embeddings = pixel_embeddings(np.asarray(test.images))
    result = evaluate_embedded(embeddings, test.labels, pairs, distance=config.eval.distance)
    return _finish(result, embeddings, pairs, config, output, distance=config.eval.distance,
                   extra={"baseline": "pixels", "split": "test", "step": None})


def evaluate_workdir(workdir: pathlib.Path, *, data_root: str | None, pairs_file: str | None,
                     output: pathlib.Path) -> dict[str, Any]:
    """Loads DIR's latest checkpoint; evaluates its test split or a folder + pairs file."""
    from facenet_jax.embed import load_encoder

    _check_output_holds_the_same_evaluation(output, data_root, pairs_file)
    if data_root is None and not (workdir / SPLIT_FILE).exists() and (
            workdir / "config.json").exists() and _is_imported(workdir):
        raise ValueError(
            f"{workdir} holds imported weights and no {SPLIT_FILE}: it has no test split of "
            "its own. Pass --data_root FOLDER (and --pairs FILE) to evaluate it on your data")
    encoder = load_encoder(workdir)
    config = encoder.config
    extra = evaluation_target(data_root, pairs_file)
    if data_root is None:
        test, pairs = test_split_and_pairs(config, workdir / SPLIT_FILE)
    else:
        mismatch = alignment_mismatch(config.data.alignment, data_root)
        if mismatch:
            warnings.warn(mismatch, UserWarning, stacklevel=2)
            logging.warning(mismatch)
        test = data.load_folder_as_configured(data_root, config.data, min_images_per_identity=1)
        pairs = (data.read_pairs(pairs_file, test) if pairs_file is not None
                 else generated_pairs(config, test))
    embeddings = encoder.embed(np.asarray(test.images))
    result = evaluate_embedded(embeddings, test.labels, pairs, distance=config.eval.distance)
    return _finish(result, embeddings, pairs, config, output, distance=config.eval.distance,
                   extra={**extra, "step": encoder.step, "model": config.model.name})


def _is_imported(workdir: pathlib.Path) -> bool:
    """Whether DIR was written by `python -m facenet_jax.pretrained` (not by training)."""
    record = json.loads((workdir / "config.json").read_text())
    return "imported" in record.get("provenance", {})


def evaluation_target(data_root: str | None, pairs_file: str | None) -> dict[str, Any]:
    """What an evaluation JSON was computed on: the run's test split, or a folder (+ pairs)."""
    if data_root is None:
        return {"split": "test"}
    return {"data_root": str(pathlib.Path(data_root).resolve()),
            "pairs": str(pathlib.Path(pairs_file).resolve()) if pairs_file else None}


def _check_output_holds_the_same_evaluation(output: pathlib.Path, data_root: str | None,
                                            pairs_file: str | None) -> None:
    """Refuses to replace an evaluation of something else (e.g. the run's test-split eval.json,
    which sweeps read, by an LFW evaluation), before loading anything."""
    if not output.exists():
        return
    wanted = evaluation_target(data_root, pairs_file)
    saved = json.loads(output.read_text())
    held = {key: saved.get(key) for key in ("split", "data_root", "pairs") if saved.get(key)}
    if held != {key: value for key, value in wanted.items() if value}:
        suggestion = output.with_name(f"eval_{pathlib.Path(data_root or 'test').name}.json")
        raise FileExistsError(
            f"{output} holds the evaluation of {_describe(held)}; evaluating "
            f"{_describe(wanted)} would replace it. Pass --output FILE (e.g. {suggestion})")


def _describe(target: dict[str, Any]) -> str:
    if target.get("split"):
        return f"the run's {target['split']} split"
    pairs = target.get("pairs")
    return f"{target.get('data_root')} ({f'pairs {pairs}' if pairs else 'generated pairs'})"


def format_summary(result: dict[str, Any]) -> str:
    """A readable few lines of the headline numbers."""
    def pct(key: str) -> str:
        value = result.get(key)
        return "n/a" if value is None else f"{100 * value:.2f}%"

    lines = [
        f"verification ({result['num_folds']}-fold, {result['num_pairs']} pairs, "
        f"{result.get('distance')} distance): accuracy {pct('accuracy')} ± "
        f"{pct('accuracy_std')}  threshold {result['threshold']:.4f}",
        f"VAL@FAR=1e-3 {pct('val@far=1e-3')} ± {pct('val@far=1e-3_std')} (actual FAR "
        f"{pct('far@far=1e-3')})  VAL@FAR=1e-2 {pct('val@far=1e-2')}  AUC "
        f"{result['auc']:.4f}  EER {pct('eer')}",
    ]
    if "recall@1" in result:
        lines.append(f"retrieval: Recall@1 {pct('recall@1')}  Recall@5 {pct('recall@5')}  "
                     f"R-precision {pct('r_precision')}  MAP@R {pct('map@r')}  one-shot top-1 "
                     f"{pct('oneshot_top1')}")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    from absl import flags

    del argv
    cli_logging()
    flags_ = flags.FLAGS
    if flags_.verification_sets or flags_.ijb:  # the benchmark evaluators (issue 15)
        _run_benchmarks(flags_)
        return
    if flags_.baseline is not None:
        if flags_.config is None:
            raise ValueError("--baseline pixels needs --config CONFIG (the run it floors)")
        output = pathlib.Path(flags_.output or "eval_pixels.json")
        result = evaluate_pixels(flags_.config, output)
    else:
        if flags_.workdir is None:
            raise ValueError("give --workdir DIR (a trained run) or --baseline pixels --config")
        if flags_.pairs is not None and flags_.data_root is None:
            raise ValueError("--pairs needs --data_root (the image folder it names)")
        workdir = pathlib.Path(flags_.workdir)
        output = pathlib.Path(flags_.output) if flags_.output else workdir / EVAL_FILE
        result = evaluate_workdir(workdir, data_root=flags_.data_root, pairs_file=flags_.pairs,
                                  output=output)
    print(format_summary(result))
    print(f"wrote {output}")


def _run_benchmarks(flags_: Any) -> None:
    """--verification_sets FOLDER and/or --ijb ROOT on DIR's latest checkpoint, flip on unless
    --noflip (as the field evaluates them)."""
    if flags_.workdir is None:
        raise ValueError("--verification_sets / --ijb need --workdir DIR (a trained run)")
    unused = [f"--{name}" for name in ("data_root", "pairs", "output", "baseline")
              if getattr(flags_, name) is not None]
    if unused:
        raise ValueError(f"{', '.join(unused)}: not used with --verification_sets / --ijb "
                         "(they write DIR/eval_verification_sets.json, DIR/eval_<ijb>.json): "
                         "run them as a separate command")
    flip = True if flags_.flip is None else flags_.flip
    if flags_.verification_sets:
        results = verification_sets.evaluate_workdir_sets(
            flags_.workdir, flags_.verification_sets, names=flags_.names, flip=flip)
        print(verification_sets.markdown_table(results))
        print(f"wrote {pathlib.Path(flags_.workdir) / verification_sets.OUTPUT_FILE}")
    if flags_.ijb:
        result = ijb.evaluate_workdir_ijb(flags_.workdir, flags_.ijb, flags_.ijb_name,
                                          flip=flip, use_detector_score=flags_.ijb_detector_score)
        print(ijb.format_ijb_summary(result))
        print(f"wrote {ijb.output_path(flags_.workdir, flags_.ijb_name)}")


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "config file (for --baseline)",
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "trained run folder")
    flags.DEFINE_string("data_root", None, "image folder to evaluate instead of the test split")
    flags.DEFINE_string("pairs", None, "LFW-format pairs file for --data_root")
    flags.DEFINE_string("output", None, "output JSON (default DIR/eval.json or "
                        "./eval_pixels.json)")
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
    app.run(main)
