"""The verification sets papers report (LFW, CFP-FP, AgeDB-30, CALFW, CPLFW) in insightface's
`.bin` format, evaluated with this project's protocol.

    python -m facenet_jax.evaluate --workdir DIR --verification_sets FOLDER
        [--names lfw,cfp_fp,agedb_30,calfw,cplfw] [--flip|--noflip] [--output FILE]

A `.bin` file is a pickle written by Python 2: a tuple (list of encoded images, list of
is-same flags), images 2i and 2i + 1 forming pair i, 112×112 aligned crops. It is read with the
restricted unpickler of `safe_pickle` (a crafted file cannot run code). Each image is then
preprocessed exactly as the run's folder loader preprocesses files (`data.center_crop`, then
`data.image_size`: `data.folder.resize_array`). A `.bin` records no alignment: the five known
sets are insightface's 5-landmark 112 px crops, any other is "unknown"; where that differs from
the crops the run expects (`data.alignment.run_alignment`), it is logged and recorded
(`alignment_mismatch`). Pairs fall into 10 folds of contiguous pairs (as sklearn's
KFold(10, shuffle=False) in insightface's `verification.py`); each set is scored with
`metrics.evaluate_embeddings` (10-fold accuracy ± std, VAL@FAR with its resolution flag, AUC,
EER). The field embeds each image and its mirror image and adds the two
(`embed.make_embedder(flip=True)`, the default here; recorded as "flip").
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import pathlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from facenet_jax import runfiles
from facenet_jax.config import json_safe, provenance, to_plain
from facenet_jax.data.alignment import crops_mismatch, run_alignment
from facenet_jax.data.folder import resize_array
from facenet_jax.data.pairs import Pairs
from facenet_jax.eval import metrics, reporting
from facenet_jax.safe_pickle import load_data_pickle

SET_NAMES = ("lfw", "cfp_fp", "agedb_30", "calfw", "cplfw")  # the column order papers use
# What the known sets hold (insightface's crops); any other .bin records nothing: unknown.
KNOWN_SET_ALIGNMENT = {"mode": "landmarks", "image_size": 112}
NUM_FOLDS = 10
OUTPUT_FILE = "eval_verification_sets.json"
TABLE_FILE = "eval_verification_sets.md"
ImageEmbedder = Callable[[np.ndarray], np.ndarray]  # uint8 [N,S,S,3] -> float [N,D]


@dataclasses.dataclass
class VerificationSet:
    """One `.bin` set: images uint8 [2M, S, S, 3] (pair i = rows 2i, 2i + 1), is_same bool [M],
    source_size: the side of the images as stored (before any resize), center_crop: the
    fraction of the shorter side kept before resizing (the run's data.center_crop)."""

    name: str
    images: np.ndarray
    is_same: np.ndarray
    source_size: int
    center_crop: float | None = None

    def pairs(self, num_folds: int = NUM_FOLDS) -> Pairs:
        """Pairs (2i, 2i + 1) in NUM_FOLDS folds of contiguous pairs, the first M mod k folds
        one pair longer (np.array_split, as KFold)."""
        m = len(self.is_same)
        sizes = [len(part) for part in np.array_split(np.arange(m), num_folds)]
        return Pairs(first=2 * np.arange(m), second=2 * np.arange(m) + 1,
                     is_same=self.is_same.copy(), fold=np.repeat(np.arange(num_folds), sizes))


def _decode(encoded: bytes, index: int, source: str) -> np.ndarray:
    """One encoded image → uint8 [H, W, 3]; ValueError naming its index when corrupt."""
    try:
        with Image.open(io.BytesIO(encoded)) as img:
            img.load()
            return np.asarray(img.convert("RGB"))
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError,
            ValueError) as error:
        raise ValueError(f"{source}: image {index} (pair {index // 2}) cannot be decoded "
                         f"({error}); the file is corrupt: download it again") from None


def _flat_flags(flags: Any, path: pathlib.Path) -> np.ndarray:
    """The is-same flags as bool [M]: a flat list of bools or a 1-D numpy bool array, checked
    before any conversion (np.asarray would walk a nested list, however large)."""
    if isinstance(flags, np.ndarray):
        if flags.ndim == 1 and flags.dtype == bool:
            return np.array(flags, dtype=bool)  # a plain copy of the unpickler's array
    elif isinstance(flags, list) and all(isinstance(f, (bool, np.bool_)) for f in flags):
        return np.array(flags, dtype=bool)
    raise ValueError(f"{path}: the second element must be a flat list of is-same flags (bools) "
                     f"or a 1-D numpy bool array, got {type(flags).__name__}")


def read_bin(path: str | pathlib.Path, image_size: int, center_crop: float | None = None
             ) -> VerificationSet:
    """Reads an insightface `.bin` file into a VerificationSet at image_size × image_size.

    Each image is preprocessed as the folder loader preprocesses a file (`resize_array`: the
    central square of `center_crop` × the shorter side, then a bilinear resize), said in one
    log line whenever that changes the stored images.
    Errors name the problem: not a data pickle (refused, nothing run), wrong structure, a flag
    count that is not half the image count, a corrupt image (its index).
    """
    path = pathlib.Path(path)
    content = load_data_pickle(path.read_bytes(), str(path), encoding="bytes")
    if not (isinstance(content, (tuple, list)) and len(content) == 2):
        raise ValueError(f"{path}: expected a pickled pair (images, is_same flags), got "
                         f"{type(content).__name__}")
    encoded, flags = content
    if not isinstance(encoded, list) or not all(isinstance(b, bytes) for b in encoded):
        raise ValueError(f"{path}: the first element must be a list of encoded images (bytes)")
    is_same = _flat_flags(flags, path)
    if len(encoded) != 2 * len(is_same) or not len(is_same):
        raise ValueError(f"{path}: {len(encoded)} images for {len(is_same)} pairs; a set holds "
                         "2 images per pair and at least one pair")
    decoded = [_decode(b, i, str(path)) for i, b in enumerate(encoded)]
    shapes = {image.shape[:2] for image in decoded}
    if center_crop is not None or shapes != {(image_size, image_size)}:
        cropped = ("" if center_crop is None else
                   f"the central {center_crop:g} kept (the run's data.center_crop), ")
        logging.info("%s: images of %s px: %sresized to %d px (data.image_size), as the run's "
                     "folder loader does", path.name, sorted(shapes), cropped, image_size)
        decoded = [resize_array(image, image_size, center_crop) for image in decoded]
    source_size = max(max(shape) for shape in shapes)
    return VerificationSet(path.stem, np.stack(decoded), is_same.astype(bool), source_size,
                           center_crop)


def find_sets(folder: str | pathlib.Path, names: Sequence[str] | None = None
              ) -> dict[str, pathlib.Path]:
    """{name: FOLDER/name.bin} for the requested names (default: every .bin there, the known
    sets first in SET_NAMES order). FileNotFoundError names what is missing and what exists."""
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"verification set folder {folder} does not exist; it should "
                                f"hold insightface's .bin files ({', '.join(SET_NAMES)})")
    present = {p.stem: p for p in sorted(folder.glob("*.bin"))}
    if names is None:
        if not present:
            raise FileNotFoundError(f"{folder} holds no .bin file; expected e.g. "
                                    f"{', '.join(n + '.bin' for n in SET_NAMES)}")
        order = [n for n in SET_NAMES if n in present] + [n for n in present
                                                          if n not in SET_NAMES]
        return {name: present[name] for name in order}
    missing = [name for name in names if name not in present]
    if missing:
        raise FileNotFoundError(
            f"{folder}: no {', '.join(n + '.bin' for n in missing)}; present: "
            f"{', '.join(sorted(present)) or 'no .bin file'}. Fix --names (or "
            "eval.verification_set_names) or add the files")
    return {name: present[name] for name in names}


def parse_names(names: str | Sequence[str] | None) -> list[str] | None:
    """"lfw,cfp_fp" or a list → ["lfw", "cfp_fp"]; None or "" → None (every set found)."""
    if names is None or isinstance(names, str) and not names.strip():
        return None
    parts = names.split(",") if isinstance(names, str) else list(names)
    return [part.strip() for part in parts if part.strip()]


def load_sets(folder: str | pathlib.Path, names: str | Sequence[str] | None, image_size: int,
              center_crop: float | None = None) -> list[VerificationSet]:
    """Every requested set of `folder`, preprocessed as the run's files (see `read_bin`)."""
    return [read_bin(path, image_size, center_crop)
            for path in find_sets(folder, parse_names(names)).values()]


def set_alignment(name: str) -> dict[str, Any] | None:
    """What a set's crops are: KNOWN_SET_ALIGNMENT for the five known names, None (unknown)
    for any other `.bin`."""
    return dict(KNOWN_SET_ALIGNMENT) if name in SET_NAMES else None


def alignment_facts(name: str, data_config: Any) -> dict[str, Any]:
    """{"alignment": "landmarks, 112 px" | "unknown", "alignment_mismatch": text | None} of set
    `name` against the crops a run of `data_config` expects; a mismatch is logged."""
    record = set_alignment(name)
    mismatch = crops_mismatch(run_alignment(data_config), record, f"{name}.bin",
                              data_config.get("center_crop"))
    if mismatch:
        logging.warning(mismatch)
    described = "unknown" if record is None else f"{record['mode']}, {record['image_size']} px"
    return {"alignment": described, "alignment_mismatch": mismatch}


def evaluate_set(embed_images: ImageEmbedder, vset: VerificationSet, *, distance: str,
                 subtract_mean: bool = False, threshold_search: str = "exact"
                 ) -> dict[str, Any]:
    """The eval.json verification keys of one set, with the VAL@FAR resolution flags
    (metrics.val_resolution), as the folder path, and the k-fold protocol's options
    (metrics.evaluate_embeddings); no identities: no retrieval metrics."""
    embeddings = embed_images(vset.images)
    pairs = vset.pairs()
    result = metrics.evaluate_embeddings(
        embeddings, np.arange(len(embeddings)), pairs.first, pairs.second, pairs.is_same,
        pairs.fold, distance=distance, subtract_mean=subtract_mean,
        threshold_search=threshold_search, include_identification=False)
    reporting.warn_unbalanced_folds(result, vset.name)
    result.update(metrics.val_resolution(pairs.is_same, pairs.fold))
    return {**result, "num_images": int(len(vset.images)), "source_image_size": vset.source_size,
            "center_crop": vset.center_crop}


def training_metrics(embed_images: ImageEmbedder, sets: Sequence[VerificationSet], *,
                     distance: str, subtract_mean: bool = False,
                     threshold_search: str = "exact") -> dict[str, float]:
    """{"eval/<set>/accuracy": ...} for the training log (every eval_every steps)."""
    return {f"eval/{vset.name}/accuracy": evaluate_set(
                embed_images, vset, distance=distance, subtract_mean=subtract_mean,
                threshold_search=threshold_search)["accuracy"]
            for vset in sets}


def configured_sets(eval_config: Any, image_size: int, data_config: Any = None
                    ) -> list[VerificationSet]:
    """The sets `config.eval.verification_sets` (a folder; None: none) names, loaded once at the
    start of training so a bad folder or file fails before anything compiles. data_config
    (`config.data`): preprocess them as its files (center_crop) and log alignment mismatches."""
    folder = eval_config.get("verification_sets")
    if not folder:
        if eval_config.get("verification_set_names"):
            raise ValueError("config.eval.verification_set_names is set but "
                             "eval.verification_sets (the folder of .bin files) is not; pass "
                             "--config.eval.verification_sets=FOLDER")
        return []
    center_crop = None if data_config is None else data_config.get("center_crop")
    try:
        sets = load_sets(folder, eval_config.get("verification_set_names"), image_size,
                         center_crop)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"config.eval.verification_sets: {error}") from None
    if data_config is not None:
        for vset in sets:
            alignment_facts(vset.name, data_config)
    return sets


def markdown_table(results: Mapping[str, Mapping[str, Any]]) -> str:
    """The papers' row (accuracy % per set) and one row per set with the other numbers; an
    unresolved VAL@FAR carries reporting.UNRESOLVED_MARK and its note."""
    names = list(results)
    def pct(value: Any) -> str:
        return "n/a" if value is None else f"{100 * value:.2f}"

    def val(r: Mapping[str, Any], key: str) -> str:
        return pct(r[key]) + (reporting.UNRESOLVED_MARK if reporting.unresolved(r, key) else "")
    lines = ["| " + " | ".join(names) + " |", "|" + "---|" * len(names),
             "| " + " | ".join(pct(results[n]["accuracy"]) for n in names) + " |", "",
             "| set | pairs | accuracy % | ± std | VAL@FAR=1e-3 % | VAL@FAR=1e-2 % | AUC | EER % "
             "| flip |", "|---|---|---|---|---|---|---|---|---|"]
    for name in names:
        r = results[name]
        lines.append(f"| {name} | {r['num_pairs']} | {pct(r['accuracy'])} | "
                     f"{pct(r['accuracy_std'])} | {val(r, 'val@far=1e-3')} | "
                     f"{val(r, 'val@far=1e-2')} | {r['auc']:.4f} | {pct(r['eer'])} | "
                     f"{r.get('flip')} |")
    if any(reporting.unresolved(results[n], f"val@far={t}") for n in names
           for t in metrics.VAL_FAR_TARGETS):
        lines += ["", reporting.unresolved_note()]
    mismatched = [n for n in names if results[n].get("alignment_mismatch")]
    if mismatched:
        lines += ["", f"Alignment: {', '.join(mismatched)} may not hold the crops the model "
                      "expects (alignment_mismatch in the JSON)."]
    return "\n".join(lines) + "\n"


def write_results(results: Mapping[str, Mapping[str, Any]], output: pathlib.Path) -> pathlib.Path:
    """Writes the JSON (atomically) and the markdown table beside it (same stem, .md)."""
    output.parent.mkdir(parents=True, exist_ok=True)
    runfiles.atomic_write_json(output, json_safe(results))
    return runfiles.atomic_write_text(output.with_suffix(".md"), markdown_table(results))


def output_path(workdir: str | pathlib.Path, output: str | pathlib.Path | None = None
                ) -> pathlib.Path:
    """Where the sets' JSON goes: `output`, else DIR/eval_verification_sets.json."""
    return pathlib.Path(output) if output else pathlib.Path(workdir) / OUTPUT_FILE


def check_output(output: pathlib.Path, paths: Mapping[str, pathlib.Path]) -> None:
    """Refuses to replace an evaluation of other sets (another folder, other names) at
    `output`, before anything is loaded; the same sets' evaluation is replaced (re-scored)."""
    if not output.exists():
        return
    wanted = {name: str(path.resolve()) for name, path in paths.items()}
    try:
        held = {name: entry.get("path") for name, entry in json.loads(output.read_text()).items()}
    except (ValueError, AttributeError):  # not this mode's JSON
        held = None
    if held != wanted:
        folder = next(iter(paths.values())).parent.resolve()
        what = (f"the sets {', '.join(f'{n} ({p})' for n, p in held.items())}" if held
                else "another evaluation")
        suggestion = output.with_name(f"{output.stem}_{folder.name}.json")
        raise FileExistsError(
            f"{output} holds {what}; evaluating {', '.join(wanted)} of {folder} would replace "
            f"it. Pass --output FILE (e.g. {suggestion})")


def evaluate_workdir_sets(workdir: str | pathlib.Path, folder: str | pathlib.Path, *,
                          names: str | Sequence[str] | None = None, flip: bool | None = True,
                          output: pathlib.Path | None = None,
                          eval_overrides: Mapping[str, str] | None = None
                          ) -> dict[str, dict[str, Any]]:
    """The CLI's work: DIR's latest checkpoint on every requested set, each preprocessed as the
    run's files → `output` (default DIR/eval_verification_sets.json; {set name: eval.json keys
    + flip, path, step, center_crop, alignment, alignment_mismatch, ...}) and the markdown
    table beside it. An output holding other sets is refused (`check_output`). flip None: the
    run's eval.flip; eval_overrides: as `evaluate --workdir --config.eval.KEY=V`
    (config.apply_evaluation_overrides)."""
    from facenet_jax.eval.embed import load_encoder  # local: jax only where a model is loaded

    paths = find_sets(folder, parse_names(names))  # before loading the model: fail fast
    output = output_path(workdir, output)
    check_output(output, paths)
    encoder = load_encoder(workdir, flip=flip, eval_overrides=eval_overrides)
    config = encoder.config
    run_facts = {"flip": config.eval.flip if flip is None else flip,
                 "flip_mode": config.eval.flip_mode, "subtract_mean": config.eval.subtract_mean,
                 "threshold_search": config.eval.threshold_search,
                 "distance": config.eval.distance,
                 "step": encoder.step, "model": config.model.name,
                 "image_size": config.data.image_size, "config": to_plain(config),
                 "provenance": provenance()}
    results = {}
    for name, path in paths.items():
        vset = read_bin(path, config.data.image_size, config.data.center_crop)
        result = evaluate_set(encoder.embed, vset, **metrics.protocol_options(config.eval))
        results[name] = {**result, "path": str(path.resolve()),
                         **alignment_facts(name, config.data), **run_facts}
        logging.info("%s: accuracy %.4f ± %.4f (%d pairs)", name, result["accuracy"],
                     result["accuracy_std"], result["num_pairs"])
    write_results(results, output)
    return results
