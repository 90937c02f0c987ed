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


def split_identities(dataset: Dataset, *, fractions: Sequence[float] = (0.8, 0.1, 0.1),
                     seed: int = 0, identity_files: str | pathlib.Path | None = None,
                     exclude_pairs_file: str | pathlib.Path | None = None,
                     exclude_pairs_from: str = "train_and_validation",
                     exclude_pairs_fold: int | None = None) -> dict[str, Dataset]:
    """Splits identities (never images) into "train", "validation" and "test".

    By `fractions` of the identities (shuffled by `seed`; test and validation sizes rounded,
    train takes the rest) or, with `identity_files`, by a folder holding train.txt,
    validation.txt and test.txt (one identity name per line; identities in none are left out,
    logged). `exclude_pairs_file`: every identity named in that pairs file moves from train and
    validation to test, so a model evaluated on those pairs never trained on those people and
    no choice (threshold, step, hyper-parameter) was made on them; exclude_pairs_from="train"
    moves them from train only (the rule of runs recorded before exclude_pairs_from existed).
    `exclude_pairs_fold`: only the identities of that fold (1-based) of the file move (one
    cross-validation fold; the other folds' people stay where the split put them).
    """
    if identity_files is not None:
        assignment = _assignment_from_files(dataset, pathlib.Path(identity_files))
    else:
        assignment = _assignment_from_fractions(dataset.num_identities, fractions, seed)
    if exclude_pairs_file is not None:
        named = pair_file_identities(exclude_pairs_file, fold=exclude_pairs_fold)
        sources = (0, 1) if exclude_pairs_from == "train_and_validation" else (0,)
        moved = [i for i, name in enumerate(dataset.identity_names)
                 if name in named and assignment[i] in sources]
        assignment[moved] = 2
        logging.info("excluded %d identities named in %s%s from %s (moved to test)",
                     len(moved), exclude_pairs_file,
                     "" if exclude_pairs_fold is None else f" (fold {exclude_pairs_fold})",
                     exclude_pairs_from.replace("_", " "))
    return {name: dataset.subset(np.flatnonzero(assignment == side))
            for side, name in enumerate(SPLITS)}


def split_dataset(dataset: Dataset, data_config: Any) -> dict[str, Dataset]:
    """split_identities driven by the `config.data` ConfigDict (its `split` block)."""
    split = data_config.split
    return split_identities(
        dataset, fractions=(split.train, split.validation, split.test), seed=split.seed,
        identity_files=split.identity_files, exclude_pairs_file=split.exclude_pairs_file,
        exclude_pairs_from=split.exclude_pairs_from,
        exclude_pairs_fold=split.get("exclude_pairs_fold"))


def split_names(splits: dict[str, Dataset]) -> dict[str, list[str]]:
    """{"train": [identity names], "validation": [...], "test": [...]}, each sorted."""
    return {name: sorted(splits[name].identity_names) for name in SPLITS}


def write_split_record(path: str | pathlib.Path, splits: dict[str, Dataset]) -> None:
    """Writes the split's identity names (atomically) so later runs can prove it unchanged."""
    atomic_write_text(path, json.dumps(split_names(splits), indent=1) + "\n")


def check_split_record(path: str | pathlib.Path, splits: dict[str, Dataset]) -> None:
    """ValueError when the identities of `splits` differ from those recorded at `path`.

    The split is recomputed from the data on disk; an identity added to or removed from the
    folder reshuffles it, and a test split holding identities the model trained on would
    inflate every metric. A missing record (runs older than it) is not checked.
    """
    path = pathlib.Path(path)
    if not path.exists():
        return
    recorded = json.loads(path.read_text())
    current = split_names(splits)
    if recorded == current:
        return
    trained = set(recorded["train"])
    leaked = sorted(trained & (set(current["test"]) | set(current["validation"])))
    changes = [f"{name}: {len(set(current[name]) - set(recorded[name]))} identities added, "
               f"{len(set(recorded[name]) - set(current[name]))} removed" for name in SPLITS]
    if leaked:
        changes.append(f"{len(leaked)} trained identities now held out, e.g. {leaked[:3]}")
    raise ValueError(
        f"the identity split differs from the one recorded in {path} ({'; '.join(changes)}). "
        "The data folder or data.split changed since this run trained: restore them, or train "
        "a new run (a new --workdir) on the current data")


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
