"""The LFW-style pairs evaluation of a run: one of its splits (or a folder and a pairs file)
embedded once and scored with the protocol of `eval.metrics`, written as JSON plus figures.

Verification on LFW-style 10-fold pairs (accuracy ± std, VAL@FAR, ROC AUC, EER), retrieval
(Recall@K, R-precision, MAP@R) and one-shot identification. A single-fold pairs file, or one
fold of a multi-fold file, is scored at a threshold chosen elsewhere (`threshold.run_threshold`
or a number). The command line is `eval.cli` (`python -m facenet_jax.evaluate`).
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

from facenet_jax import data, runfiles
from facenet_jax.config import json_safe, pairs_seed, provenance, to_plain
from facenet_jax.data.alignment import alignment_mismatch, run_alignment
from facenet_jax.eval import metrics, plots, reporting
from facenet_jax.eval.threshold import run_threshold
from facenet_jax.runfiles import EVAL_FILE, SPLIT_FILE, VALIDATION_EVAL_FILE


def evaluate_dataset(embed: Callable[[Any, np.ndarray], np.ndarray], variables: Any,
                     dataset: data.Dataset, pairs: data.Pairs, *, distance: str,
                     subtract_mean: bool = False, threshold_search: str = "exact"
                     ) -> dict[str, Any]:
    """Embeds every image of `dataset` once and computes all metrics on it and its pairs."""
    embeddings = embed(variables, dataset.images)
    return evaluate_embedded(embeddings, dataset.labels, pairs, distance=distance,
                             subtract_mean=subtract_mean, threshold_search=threshold_search)


def evaluate_embedded(embeddings: np.ndarray, labels: np.ndarray, pairs: data.Pairs, *,
                      distance: str, threshold: float | None = None,
                      identification: str = "all", subtract_mean: bool = False,
                      threshold_search: str = "exact") -> dict[str, Any]:
    """All metrics from embeddings [N,D] and integer labels [N] (pairs index into them).

    threshold None: the k-fold protocol (metrics.evaluate_embeddings) plus, per VAL@FAR target,
    `val@far=T_resolved` (metrics.val_resolution: False when the training folds hold fewer
    than 1/T different pairs). A threshold: verification at it (accuracy, tar, far), AUC, EER
    and `roc_val@far=T` (metrics.val_on_roc, with `roc_val@far=T_resolved`).
    identification: "all" images, only the identities the "pairs" use, or "none". Both ways,
    `num_pair_identities` and `num_different_pairs` (metrics.pair_counts): what a threshold
    chosen on these pairs rests on.
    subtract_mean, threshold_search: the k-fold protocol's (metrics.evaluate_embeddings); a
    fixed threshold searches nothing, and has no training folds to take a mean from.
    """
    if identification not in ("all", "pairs", "none"):
        raise ValueError(f"identification must be 'all', 'pairs' or 'none', got "
                         f"{identification!r}")
    check_fixed_threshold_protocol(threshold, subtract_mean)
    if threshold is None:
        result = metrics.evaluate_embeddings(embeddings, labels, pairs.first, pairs.second,
                                             pairs.is_same, pairs.fold, distance=distance,
                                             subtract_mean=subtract_mean,
                                             threshold_search=threshold_search,
                                             include_identification=identification == "all")
        reporting.warn_unbalanced_folds(result)
        result.update(metrics.val_resolution(pairs.is_same, pairs.fold))
    else:
        d = metrics.pair_distances(embeddings, pairs.first, pairs.second, distance)
        result = metrics.verification_at_threshold(d, pairs.is_same, threshold)
        result.update({"auc": metrics.roc_auc(d, pairs.is_same),
                       "eer": metrics.equal_error_rate(d, pairs.is_same)[0],
                       "num_folds": len(np.unique(pairs.fold))})
        # VAL@FAR off the scored pairs' own ROC (no threshold is chosen elsewhere for it);
        # resolved when the pairs hold at least 1/target different pairs.
        different = int(np.sum(~pairs.is_same))
        for name, target in metrics.VAL_FAR_TARGETS.items():
            result[f"roc_val@far={name}"] = metrics.val_on_roc(d, pairs.is_same, target)
            result[f"roc_val@far={name}_resolved"] = different * target >= 1
        if identification == "all":
            result.update(metrics.identification_metrics(embeddings, labels, distance=distance))
    result.update(metrics.pair_counts(labels, pairs.first, pairs.second, pairs.is_same))
    if identification == "pairs":
        used = np.isin(labels, labels[np.concatenate([pairs.first, pairs.second])])
        result.update(metrics.identification_metrics(embeddings[used], labels[used],
                                                     distance=distance))
        result["identification_on"] = (f"the {int(used.sum())} images of the "
                                       f"{len(np.unique(labels[used]))} identities in the pairs")
    return result


def check_fixed_threshold_protocol(threshold: float | str | None, subtract_mean: bool
                                   ) -> None:
    """ValueError when a fixed threshold (a number, "run") meets eval.subtract_mean=True: only
    the k-fold protocol has training folds to take the mean from."""
    if threshold is not None and subtract_mean:
        raise ValueError("eval.subtract_mean=True needs the k-fold protocol (the training "
                         "folds' mean); scoring at a fixed threshold (one fold, --threshold) "
                         "subtracts none: pass --config.eval.subtract_mean=False")


def select_fold(pairs: data.Pairs, fold: int) -> data.Pairs:
    """The pairs of fold `fold` (1-based, file order, as LFW numbers its folds)."""
    count = len(np.unique(pairs.fold))
    if not 1 <= fold <= count:
        raise ValueError(f"--fold {fold}: the pairs file has folds 1..{count}")
    keep = pairs.fold == np.unique(pairs.fold)[fold - 1]
    return data.Pairs(pairs.first[keep], pairs.second[keep], pairs.is_same[keep],
                      pairs.fold[keep])


def pixel_embeddings(images: np.ndarray) -> np.ndarray:
    """The raw-pixel baseline: uint8 [N,H,W,3] → [0,1], flattened, L2-normalised [N, H*W*3]."""
    flat = images.reshape(len(images), -1).astype(np.float32) / 255.0
    return metrics.l2_normalize_rows(flat)


RUN_SPLITS = ("train", "validation", "test")


def check_run_split(split: str) -> None:
    """ValueError naming the run's splits when `split` (--split) is not one of them."""
    if split not in RUN_SPLITS:
        raise ValueError(f"--split {split!r}: choose one of the run's splits {RUN_SPLITS}")


def split_and_pairs(config: ml_collections.ConfigDict,
                    split_record: pathlib.Path | None = None, split: str = "test"
                    ) -> tuple[data.Dataset, data.Pairs]:
    """One split (RUN_SPLITS) of a config's data and its generated pairs (deterministic from
    seeds). `split_record`: a run's split.json; the split recomputed from the data must match.
    """
    check_run_split(split)
    splits = data.split_dataset(data.load_dataset(config.data), config.data)
    if split_record is not None:
        data.check_split_record(split_record, splits)
    return splits[split], generated_pairs(config, splits[split], split)


def test_split_and_pairs(config: ml_collections.ConfigDict,
                         split_record: pathlib.Path | None = None
                         ) -> tuple[data.Dataset, data.Pairs]:
    """`split_and_pairs` of the test split (the name notebooks and user code call)."""
    return split_and_pairs(config, split_record, "test")


def generated_pairs(config: ml_collections.ConfigDict, dataset: data.Dataset,
                    split: str = "evaluation") -> data.Pairs:
    """The config's LFW-style pairs on `dataset` (the `split` named in the log line)."""
    if dataset.num_identities < 2:
        raise ValueError(
            f"the {split} split has {dataset.num_identities} identities; pairs need at "
            "least 2: raise data.split.test (or validation)")
    pairs = data.generate_pairs(dataset, num_folds=config.data.pairs.num_folds,
                                pairs_per_fold=config.data.pairs.pairs_per_fold,
                                seed=pairs_seed(config))
    per_fold = int(np.sum(pairs.is_same & (pairs.fold == 0)))
    logging.info("%s split: %d pairs, %d folds of %d same + %d different (asked for %d), from "
                 "%d identities, %d images", split, len(pairs), config.data.pairs.num_folds,
                 per_fold, per_fold, config.data.pairs.pairs_per_fold, dataset.num_identities,
                 len(dataset.labels))
    return pairs


def write_evaluation(result: dict[str, Any], output: pathlib.Path, *,
                     distances: np.ndarray, is_same: np.ndarray) -> dict[str, Any]:
    """Writes the JSON (atomically) and the ROC and histogram figures beside it: for
    DIR/NAME.json, DIR/NAME_roc.png and DIR/NAME_distances.png, titled by figure_title."""
    output.parent.mkdir(parents=True, exist_ok=True)
    stem = output.with_suffix("")
    far, tar, _ = metrics.roc_curve(distances, is_same)
    title = figure_title(result, output)
    result["figures"] = {
        "roc": str(plots.plot_roc(far, tar, f"{stem}_roc.png", auc=result["auc"],
                                  eer=result["eer"], log_far=True,
                                  far_min=min(1e-4, far[far > 0].min()),
                                  points=val_operating_points(result), title=f"ROC: {title}")),
        "histogram": str(plots.plot_distance_histogram(
            distances, is_same, result["threshold"], f"{stem}_distances.png",
            title=f"Pair distances: {title}")),
    }
    # Per-writer temporary file: two sweep aggregations may compute one pixel baseline at once.
    runfiles.atomic_write_json(output, json_safe(result))
    return result


def figure_title(result: dict[str, Any], output: pathlib.Path) -> str:
    """"run · data · split · step · distance" for an evaluation's figures (the run is the
    output's folder)."""
    config = result.get("config") or {}
    source = (config.get("data") or {}).get("source")
    root = (config.get("data") or {}).get("root")
    if result.get("data_root"):
        pairs = result.get("pairs")
        what = (f"{pathlib.Path(result['data_root']).name}, "
                f"{pathlib.Path(pairs).name if pairs else 'generated pairs'}"
                f"{', fold ' + str(result['fold']) if result.get('fold') else ''}")
    else:
        data_name = pathlib.Path(root).name if root else source
        what = f"{data_name}, {result.get('split') or result.get('baseline')} split"
    step = result.get("step")
    return (f"{output.parent.name} · {what} · "
            f"{'step ' + str(step) if step is not None else result.get('baseline', '')} · "
            f"{result.get('distance')}")


def val_operating_points(result: dict[str, Any]) -> dict[str, tuple[float, float]]:
    """{"VAL@FAR=1e-3": (held-out FAR, VAL), ...} for the ROC figure (FAR > 0 only: a log
    axis cannot show 0); an unresolved target is labelled so (the legend also gives the point's
    actual FAR, which then can be far above the target)."""
    return {f"VAL@FAR={name}" + (" (unresolved)" if reporting.unresolved(
                result, f"val@far={name}") else ""):
            (result[f"far@far={name}"], result[f"val@far={name}"])
            for name in metrics.VAL_FAR_TARGETS if (result.get(f"far@far={name}") or 0) > 0}


def _finish(result: dict[str, Any], embeddings: np.ndarray, pairs: data.Pairs,
            config: ml_collections.ConfigDict, output: pathlib.Path | None, *,
            distance: str, extra: dict[str, Any]) -> dict[str, Any]:
    protocol = {key: config.eval[key] for key in ("flip", "flip_mode", "subtract_mean",
                                                   "threshold_search")}
    result = {**result, **protocol, **extra, "distance": distance, "config": to_plain(config),
              "provenance": provenance()}
    if output is None:
        return result
    # Each pair's distance as its fold was scored (mean-subtracted when the protocol is).
    distances = metrics.held_out_distances(metrics.fold_distances(
        embeddings, pairs.first, pairs.second, pairs.fold, distance,
        subtract_mean=config.eval.subtract_mean),
        pairs.fold)
    return write_evaluation(result, output, distances=distances, is_same=pairs.is_same)


def run_split_eval_file(split: str) -> str:
    """Where a run's evaluation of its own `split` goes in DIR: eval.json (test, which sweeps
    read), eval_validation.json (the run's threshold), eval_train.json."""
    return {"test": EVAL_FILE, "validation": VALIDATION_EVAL_FILE}.get(split, f"eval_{split}.json")


def evaluate_run_test_split(config: ml_collections.ConfigDict, workdir: pathlib.Path,
                            embed: Callable, variables: Any, test: data.Dataset, *, step: int,
                            write: bool = True, split: str = "test") -> dict[str, Any]:
    """End-of-training evaluation on the run's test split → DIR/eval.json (+ figures); with
    split="validation", on the validation split → DIR/eval_validation.json."""
    pairs = generated_pairs(config, test, split)
    embeddings = embed(variables, test.images)
    result = evaluate_embedded(embeddings, test.labels, pairs,
                               **metrics.protocol_options(config.eval))
    output = workdir / run_split_eval_file(split)
    return _finish(result, embeddings, pairs, config, output if write else None,
                   distance=config.eval.distance,
                   extra={"step": step, "split": split, "model": config.model.name})


def evaluate_pixels(config: ml_collections.ConfigDict, output: pathlib.Path | None
                    ) -> dict[str, Any]:
    """The raw-pixel floor on exactly the pairs and images the config's run is evaluated on."""
    test, pairs = split_and_pairs(config)
    embeddings = pixel_embeddings(np.asarray(test.images))
    result = evaluate_embedded(embeddings, test.labels, pairs,
                               **metrics.protocol_options(config.eval))
    return _finish(result, embeddings, pairs, config, output, distance=config.eval.distance,
                   extra={"baseline": "pixels", "split": "test", "step": None,
                          "flip": False})  # pixels: no mirror image, whatever eval.flip says


def evaluate_workdir(workdir: pathlib.Path, *, data_root: str | None, pairs_file: str | None,
                     output: pathlib.Path, threshold: float | str | None = None,
                     fold: int | None = None, split: str = "test",
                     eval_overrides: dict[str, str] | None = None) -> dict[str, Any]:
    """Loads DIR's latest checkpoint; evaluates one of its splits (RUN_SPLITS: "test", or
    "train" / "validation", e.g. to see how much better the run separates the people it
    trained on than unseen ones) or a folder + pairs file.

    fold: score only that fold (1-based) of the pairs. threshold: a number, "run" (the run's
    own, `run_threshold`) or None: k-fold thresholds, or "run" when only one fold is scored.
    The threshold is resolved before anything is embedded. eval_overrides: evaluation-only
    keys changed for this evaluation ({"eval.distance": "angular"}, `--config.eval.KEY=V`;
    config.apply_evaluation_overrides), recorded in the output's config.
    """
    from facenet_jax.eval.embed import load_encoder  # local: jax only where a model is loaded

    if fold is not None and pairs_file is None:
        raise ValueError("--fold needs --pairs (and --data_root): it selects a fold of a pairs "
                         "file")
    check_run_split(split)  # before loading anything
    if data_root is not None and split != "test":
        raise ValueError(f"--split {split} evaluates one of the run's own splits; with "
                         "--data_root the folder is evaluated instead: drop one of the two")
    check_output_holds_the_same_evaluation(output, data_root, pairs_file, fold, split)
    workdir = pathlib.Path(workdir)
    if (data_root is None and not (workdir / SPLIT_FILE).exists()
            and _is_imported(workdir)):
        raise ValueError(
            f"{workdir} holds imported weights and no {SPLIT_FILE}: it has no test split of "
            "its own. Pass --data_root FOLDER (and --pairs FILE) to evaluate it on your data")
    encoder = load_encoder(workdir, eval_overrides=eval_overrides)
    config = encoder.config
    extra = evaluation_target(data_root, pairs_file, fold, split)
    if data_root is None:
        test, pairs = split_and_pairs(config, workdir / SPLIT_FILE, split)
    else:
        mismatch = alignment_mismatch(run_alignment(config.data), data_root,
                                      config.data.center_crop)
        if mismatch:
            warnings.warn(mismatch, UserWarning, stacklevel=2)
            logging.warning(mismatch)
        extra["alignment_mismatch"] = mismatch
        test = data.load_folder_as_configured(data_root, config.data, min_images_per_identity=1)
        pairs = (data.read_pairs(pairs_file, test) if pairs_file is not None
                 else generated_pairs(config, test, "folder"))
    if fold is not None:
        pairs = select_fold(pairs, fold)
    if pairs_file is not None:  # identification="pairs": the rest of the folder is never read
        test, pairs = data.restrict_to_pair_identities(test, pairs)
    if threshold is None and len(np.unique(pairs.fold)) < 2:
        threshold = "run"
        logging.info("one fold of pairs: scored at the run's own threshold (--threshold T to "
                     "give one)")
    check_fixed_threshold_protocol(threshold, config.eval.subtract_mean)
    if threshold == "run":
        chosen = run_threshold(workdir)
        if chosen["distance"] != config.eval.distance:
            raise ValueError(f"the run's threshold is in {chosen['distance']} distance, its "
                             f"eval.distance is {config.eval.distance}; pass --threshold T")
        threshold = chosen["threshold"]
        extra["threshold_source"] = (f"the run's {chosen['split']} split at step "
                                     f"{chosen['step']} ({chosen['source']})")
        extra["threshold_warning"] = chosen["warning"]
    elif threshold is not None:
        threshold = float(threshold)
        extra["threshold_source"] = "given (--threshold)"
    embeddings = encoder.embed(np.asarray(test.images))
    result = evaluate_embedded(embeddings, test.labels, pairs, threshold=threshold,
                               identification="pairs" if pairs_file else "all",
                               **metrics.protocol_options(config.eval))
    return _finish(result, embeddings, pairs, config, output, distance=config.eval.distance,
                   extra={**extra, "step": encoder.step, "model": config.model.name})


def _is_imported(workdir: pathlib.Path) -> bool:
    """Whether DIR was written by `python -m facenet_jax.pretrained` (not by training)."""
    record = runfiles.read_run_record(workdir)
    return record is not None and "imported" in record["provenance"]


def evaluation_target(data_root: str | None, pairs_file: str | None,
                      fold: int | None = None, split: str = "test") -> dict[str, Any]:
    """What an evaluation JSON was computed on: one of the run's splits, or a folder (+ pairs,
    + the fold scored)."""
    if data_root is None:
        return {"split": split}
    target = {"data_root": str(pathlib.Path(data_root).resolve()),
              "pairs": str(pathlib.Path(pairs_file).resolve()) if pairs_file else None}
    if fold is not None:
        target["fold"] = fold
    return target


def check_output_holds_the_same_evaluation(output: pathlib.Path, data_root: str | None,
                                            pairs_file: str | None, fold: int | None = None,
                                            split: str = "test", baseline: str | None = None
                                            ) -> None:
    """Refuses to replace an evaluation of something else (e.g. the run's test-split eval.json,
    which sweeps read, by an LFW evaluation or a `baseline`), before loading anything."""
    if not output.exists():
        return
    wanted = {**evaluation_target(data_root, pairs_file, fold, split), "baseline": baseline}
    saved = json.loads(output.read_text())
    held = {key: saved.get(key) for key in ("split", "data_root", "pairs", "fold", "baseline")
            if saved.get(key)}
    if held != {key: value for key, value in wanted.items() if value}:
        suggestion = output.with_name(f"eval_{pathlib.Path(data_root or 'test').name}.json")
        raise FileExistsError(
            f"{output} holds the evaluation of {_describe(held)}; evaluating "
            f"{_describe(wanted)} would replace it. Pass --output FILE (e.g. {suggestion})")


def _describe(target: dict[str, Any]) -> str:
    if target.get("baseline"):
        return f"the {target['baseline']} baseline of a config's test split"
    if target.get("split"):
        return f"the run's {target['split']} split"
    pairs = target.get("pairs")
    return f"{target.get('data_root')} ({f'pairs {pairs}' if pairs else 'generated pairs'})"


def format_summary(result: dict[str, Any]) -> str:
    """A readable few lines of the headline numbers."""
    def pct(key: str) -> str:
        value = result.get(key)
        return "n/a" if value is None else f"{100 * value:.2f}%"

    def threshold() -> str:
        # -inf (the k-fold "accept nothing", e.g. collapsed embeddings) is null in the JSON
        value = result.get("threshold")
        return ("-inf (accepts nothing)" if value is None or value == -np.inf
                else f"{value:.4f}")

    def resolved(name: str) -> str:
        return (f" [unresolved: under 1/{name} different pairs in the training folds]"
                if reporting.unresolved(result, f"val@far={name}") else "")

    if "threshold_source" in result:
        lines = [
            f"verification at a fixed threshold {result['threshold']:.4f} "
            f"({result['threshold_source']}; {result['num_pairs']} pairs, "
            f"{result.get('distance')} distance): accuracy {pct('accuracy')}  TAR "
            f"{pct('tar')}  FAR {pct('far')}",
            f"AUC {result['auc']:.4f}  EER {pct('eer')}",
        ]
        if result.get("threshold_warning"):
            lines.append(f"warning: {result['threshold_warning']}")
    else:
        lines = [
            f"verification ({result['num_folds']}-fold, {result['num_pairs']} pairs, "
            f"{result.get('distance')} distance{_protocol_words(result)}): accuracy "
            f"{pct('accuracy')} ± {pct('accuracy_std')}  threshold {threshold()}",
            f"VAL@FAR=1e-3 {pct('val@far=1e-3')} ± {pct('val@far=1e-3_std')} (actual FAR "
            f"{pct('far@far=1e-3')}){resolved('1e-3')}  VAL@FAR=1e-2 {pct('val@far=1e-2')}"
            f"{resolved('1e-2')}  AUC {result['auc']:.4f}  EER {pct('eer')}",
        ]
    if "recall@1" in result:
        lines.append(f"retrieval: Recall@1 {pct('recall@1')}  Recall@5 {pct('recall@5')}  "
                     f"R-precision {pct('r_precision')}  MAP@R {pct('map@r')}  one-shot top-1 "
                     f"{pct('oneshot_top1')}"
                     + (f" (on {result['identification_on']})"
                        if "identification_on" in result else ""))
    return "\n".join(lines)


def _protocol_words(result: dict[str, Any]) -> str:
    """", mirror concatenated, training folds' mean subtracted, 0.01 grid" for the options of
    the k-fold protocol that differ from its defaults ("" when none do)."""
    words = []
    if result.get("flip"):
        words.append(f"mirror {'concatenated' if result.get('flip_mode') == 'concat' else 'added'}")
    if result.get("subtract_mean"):
        words.append("training folds' mean subtracted")
    if result.get("threshold_search") == "grid":
        words.append("0.01 threshold grid")
    return "".join(f", {word}" for word in words)


def threshold_flag(value: str | None) -> float | str | None:
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
