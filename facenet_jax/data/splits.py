"""Identity-disjoint train / validation / test splits."""

from __future__ import annotations

import json
import logging
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from facenet_jax.data.dataset import Dataset
from facenet_jax.data.pairs import parse_pairs_file
from facenet_jax.runfiles import atomic_write_text

SPLITS = ("train", "validation", "test")
IMAGE_COUNTS_KEY = "image_counts"  # split.json: {identity name: its number of images}
# Only this fold (1-based, as LFW numbers them) of data.split.exclude_pairs_file is excluded:
# cross-validation over the folds (facenet_jax.crossval); None: all its folds.
EXCLUDE_FOLD_KEY = "data.split.exclude_pairs_fold"


def validate_exclude_fold(split_config: Any) -> None:
    """data.split.exclude_pairs_fold: None, or an integer >= 1 with an exclude_pairs_file (its
    upper bound, the file's fold count, is checked where the file is read)."""
    fold = split_config.exclude_pairs_fold
    if fold is None:
        return
    if isinstance(fold, bool) or not isinstance(fold, int) or fold < 1:
        raise ValueError(f"data.split.exclude_pairs_fold must be a fold number >= 1 (1-based, "
                         f"as LFW numbers its folds) or unset, got {fold!r}")
    if split_config.exclude_pairs_file is None:
        raise ValueError(f"data.split.exclude_pairs_fold={fold} selects a fold of "
                         "data.split.exclude_pairs_file, which is unset; set both (or run "
                         "python -m facenet_jax.crossval, which sets them per fold)")


def split_identities(dataset: Dataset, *, fractions: Sequence[float] = (0.8, 0.1, 0.1),
                     seed: int = 0, identity_files: str | pathlib.Path | None = None,
                     exclude_pairs_file: str | pathlib.Path | None = None,
                     exclude_pairs_fold: int | None = None) -> dict[str, Dataset]:
    """Splits identities (never images) into "train", "validation" and "test".

    By `fractions` of the identities (shuffled by `seed`; test and validation sizes rounded,
    train takes the rest) or, with `identity_files`, by a folder holding train.txt,
    validation.txt and test.txt (one identity name per line; identities in none are left out,
    logged). `exclude_pairs_file`: every identity named in that pairs file moves from train and
    validation to test, so a model evaluated on those pairs never trained on those people and
    no choice (threshold, step, hyper-parameter) was made on them.
    `exclude_pairs_fold`: only the identities of that fold (1-based) of the file move (one
    cross-validation fold; the other folds' people stay where the split put them).
    """
    if identity_files is not None:
        assignment = _assignment_from_files(dataset, pathlib.Path(identity_files))
    else:
        assignment = _assignment_from_fractions(dataset.num_identities, fractions, seed)
    if exclude_pairs_file is not None:
        named = pair_file_identities(exclude_pairs_file, fold=exclude_pairs_fold)
        moved = [i for i, name in enumerate(dataset.identity_names)
                 if name in named and assignment[i] in (0, 1)]  # not: left out (-1)
        assignment[moved] = 2
        logging.info("excluded %d identities named in %s%s from train and validation (moved "
                     "to test)", len(moved), exclude_pairs_file,
                     "" if exclude_pairs_fold is None else f" (fold {exclude_pairs_fold})")
    return {name: dataset.subset(np.flatnonzero(assignment == side))
            for side, name in enumerate(SPLITS)}


def split_dataset(dataset: Dataset, data_config: Any) -> dict[str, Dataset]:
    """split_identities driven by the `config.data` ConfigDict (its `split` block)."""
    split = data_config.split
    return split_identities(
        dataset, fractions=(split.train, split.validation, split.test), seed=split.seed,
        identity_files=split.identity_files, exclude_pairs_file=split.exclude_pairs_file,
        exclude_pairs_fold=split.exclude_pairs_fold)


def split_names(splits: dict[str, Dataset]) -> dict[str, list[str]]:
    """{"train": [identity names], "validation": [...], "test": [...]}, each sorted."""
    return {name: sorted(splits[name].identity_names) for name in SPLITS}


def image_counts(splits: dict[str, Dataset]) -> dict[str, int]:
    """{identity name: its number of images} over every split, sorted by name."""
    counts = {name: int(count) for split in splits.values()
              for name, count in zip(split.identity_names, split.counts())}
    return dict(sorted(counts.items()))


def split_record(splits: dict[str, Dataset]) -> dict[str, Any]:
    """What split.json holds: split_names, and IMAGE_COUNTS_KEY: image_counts (so the same
    data reached by another data.root is recognised as the same)."""
    return {**split_names(splits), IMAGE_COUNTS_KEY: image_counts(splits)}


def write_split_record(path: str | pathlib.Path, splits: dict[str, Dataset]) -> None:
    """Writes the split record (atomically) so later runs can prove the data unchanged."""
    atomic_write_text(path, json.dumps(split_record(splits), indent=1) + "\n")


def check_split_record(path: str | pathlib.Path, splits: dict[str, Dataset], *,
                       moved_from: str | None = None) -> None:
    """ValueError when the identities of `splits`, or their image counts, differ from those
    recorded at `path`; the message says exactly what differs.

    The split is recomputed from the data on disk; an identity added to or removed from the
    folder reshuffles it, and a test split holding identities the model trained on would
    inflate every metric. `moved_from`: the data.root the record was made with, when the
    current one is another (a resume from a moved folder), named in the error. A missing
    record (a folder written by pretrained holds none) is not checked.
    """
    path = pathlib.Path(path)
    if not path.exists():
        return
    recorded = json.loads(path.read_text())
    current = split_record(splits)
    changes = split_changes(recorded, current)
    if not changes:
        return
    cause = (f"data.root is not the folder this run was trained on ({moved_from}), and it does "
             "not hold the same images: point data.root at that data" if moved_from is not None
             else "The data folder or data.split changed since this run trained: restore them")
    raise ValueError(
        f"the identity split differs from the one recorded in {path} ({'; '.join(changes)}). "
        f"{cause}, or train a new run (a new --workdir) on the current data")


def split_changes(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """What differs between two split records (split_record): per split, the identities added
    and removed (a few named); the trained identities now held out; the identities whose image
    count changed (a few named, with both counts). [] when they are the same."""
    changes = []
    for name in SPLITS:
        added = sorted(set(current[name]) - set(recorded[name]))
        removed = sorted(set(recorded[name]) - set(current[name]))
        if added or removed:
            changes.append(f"{name}: {len(added)} identities added{_examples(added)}, "
                           f"{len(removed)} removed{_examples(removed)}")
    leaked = sorted(set(recorded["train"]) & (set(current["test"]) | set(current["validation"])))
    if leaked:
        changes.append(f"{len(leaked)} trained identities now held out, e.g. {leaked[:3]}")
    old, new = recorded[IMAGE_COUNTS_KEY], current[IMAGE_COUNTS_KEY]
    recounted = [f"{n}: {old[n]} recorded, {new[n]} now" for n in sorted(old.keys() & new.keys())
                 if old[n] != new[n]]
    if recounted:
        changes.append(f"{len(recounted)} identities hold another number of images "
                       f"({'; '.join(recounted[:3])}{'; ...' if len(recounted) > 3 else ''})")
    return changes


def _examples(names: list[str]) -> str:
    return f" ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})" if names else ""


def pair_file_identities(path: str | pathlib.Path, fold: int | None = None) -> set[str]:
    """Every identity name in an LFW-format pairs file (images are not resolved), parsed as
    `read_pairs` parses it: a malformed line is a ValueError naming it, never skipped.
    fold: only the names of that fold (1-based, file order); ValueError when out of range."""
    per_fold, parsed = parse_pairs_file(path)
    if fold is not None:
        num_folds = len(parsed) // per_fold
        if not 1 <= fold <= num_folds:
            raise ValueError(f"fold {fold} of {path}: the file has folds 1..{num_folds} "
                             "(data.split.exclude_pairs_fold, crossval --folds)")
        parsed = parsed[(fold - 1) * per_fold:fold * per_fold]
    return {name for _, pair, _ in parsed for name, _ in pair}


def _assignment_from_fractions(num_identities: int, fractions: Sequence[float],
                               seed: int) -> np.ndarray:
    """int [num_identities]: 0 train, 1 validation, 2 test."""
    fractions = tuple(float(f) for f in fractions)
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"split fractions (train, validation, test) must be 3 non-negative "
                         f"numbers summing to 1, got {fractions}; set data.split.train/"
                         ".validation/.test")
    num_val = int(round(fractions[1] * num_identities))
    num_test = int(round(fractions[2] * num_identities))
    order = np.random.default_rng([seed, 0x5B1]).permutation(num_identities)
    assignment = np.zeros(num_identities, np.int64)
    assignment[order[:num_test]] = 2
    assignment[order[num_test:num_test + num_val]] = 1
    return assignment


def _assignment_from_files(dataset: Dataset, folder: pathlib.Path) -> np.ndarray:
    index = {name: i for i, name in enumerate(dataset.identity_names)}
    assignment = np.full(dataset.num_identities, -1, np.int64)
    for side, split in enumerate(SPLITS):
        path = folder / f"{split}.txt"
        if not path.is_file():
            raise FileNotFoundError(f"identity list {path} not found; data.split.identity_files "
                                    "must be a folder with train.txt, validation.txt, test.txt")
        names = [l.strip() for l in path.read_text().splitlines()
                 if l.strip() and not l.startswith("#")]
        unknown = [n for n in names if n not in index]
        if unknown:
            raise ValueError(f"{path}: {len(unknown)} identities are not in the dataset: "
                             f"{unknown[:20]}")
        for name in names:
            if assignment[index[name]] not in (-1, side):
                raise ValueError(f"{path}: identity {name!r} is also listed in "
                                 f"{SPLITS[assignment[index[name]]]}.txt")
            assignment[index[name]] = side
    left_out = int(np.sum(assignment < 0))
    if left_out:
        logging.info("%d identities are in none of the lists in %s: left out", left_out, folder)
    return assignment
