"""Verification pairs in LFW's pairs.txt format: reading, writing and generating them.

Format: a header `N_folds N_per_fold` (or one number: a single fold), then per fold N_per_fold
same-identity lines `name n1 n2` and N_per_fold different-identity lines `name1 n1 name2 n2`.
Image number n of identity `name` is the file whose stem is `name_%04d` (LFW) or the number
itself (ORL: `s1/3.pgm`); for identities whose stems are not numbers (Yale B) and for
generated data without files, n is the 1-based position of the image in the dataset's order.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
import re

import numpy as np

from facenet_jax.data.dataset import Dataset

_MAX_ENUMERATED = 200_000  # candidate pairs enumerated exactly; above, rejection sampling


@dataclasses.dataclass
class Pairs:
    """first, second: int [M] indices into a Dataset; is_same: bool [M]; fold: int [M]."""

    first: np.ndarray
    second: np.ndarray
    is_same: np.ndarray
    fold: np.ndarray

    def __len__(self) -> int:
        return len(self.first)


def image_numbers(dataset: Dataset) -> np.ndarray:
    """The LFW image number of every image, int [N] (see the module docstring)."""
    numbers = np.zeros(len(dataset.labels), np.int64)
    for identity, name in enumerate(dataset.identity_names):
        rows = np.flatnonzero(dataset.labels == identity)
        parsed = None
        if dataset.paths is not None:
            pattern = re.compile(rf"(?:{re.escape(name)}_)?(\d+)")
            matches = [pattern.fullmatch(pathlib.Path(dataset.paths[r]).stem) for r in rows]
            if all(matches):
                parsed = [int(m.group(1)) for m in matches]
        if parsed is None or len(set(parsed)) != len(parsed):
            parsed = range(1, len(rows) + 1)
        numbers[rows] = parsed
    return numbers


def read_pairs(path: str | pathlib.Path, dataset: Dataset) -> Pairs:
    """Reads a pairs.txt against `dataset`; fold of each pair by position (file order).

    Malformed lines raise ValueError with their line number; pairs whose images are not in the
    dataset raise one FileNotFoundError listing every missing image.
    """
    lines = pathlib.Path(path).read_text().splitlines()
    if not lines or not lines[0].split():
        raise ValueError(f"{path}: empty file; expected a header 'N_folds N_per_fold'")
    header = lines[0].split()
    try:
        num_folds, per_fold = (1, int(header[0])) if len(header) == 1 else map(int, header)
    except ValueError:
        raise ValueError(f"{path}:1: header {lines[0]!r} must be 'N_folds N_per_fold'") from None
    if len(header) > 2 or num_folds < 1 or per_fold < 1:
        raise ValueError(f"{path}:1: header {lines[0]!r} must be 'N_folds N_per_fold'")
    body = [(n, line.split()) for n, line in enumerate(lines[1:], start=2) if line.strip()]
    if len(body) != 2 * num_folds * per_fold:
        raise ValueError(f"{path}: the header promises {num_folds} folds × {2 * per_fold} "
                         f"pairs = {2 * num_folds * per_fold} lines, found {len(body)}")
    lookup = {(name, int(number)): i for i, (name, number) in enumerate(
        zip((dataset.identity_names[l] for l in dataset.labels), image_numbers(dataset)))}
    first, second, is_same, missing = [], [], [], []

    def resolve(name: str, number: str, line_no: int) -> int:
        if not number.isdigit():
            raise ValueError(f"{path}:{line_no}: image number {number!r} is not an integer")
        index = lookup.get((name, int(number)), -1)
        if index < 0:
            missing.append(f"{name}/{name}_{int(number):04d}.* (line {line_no})")
        return index

    for line_no, fields in body:
        if len(fields) == 3:
            a, b = (fields[0], fields[1]), (fields[0], fields[2])
        elif len(fields) == 4:
            a, b = (fields[0], fields[1]), (fields[2], fields[3])
        else:
            raise ValueError(f"{path}:{line_no}: expected 3 fields (same) or 4 (different), "
                             f"got {len(fields)}: {' '.join(fields)!r}")
        first.append(resolve(*a, line_no))
        second.append(resolve(*b, line_no))
        is_same.append(len(fields) == 3)
    if missing:
        shown = "\n  ".join(missing[:50])
        more = f"\n  ... and {len(missing) - 50} more" if len(missing) > 50 else ""
        raise FileNotFoundError(f"{path}: {len(missing)} paired images are not in the dataset "
                                f"(is the pairs file for this folder?):\n  {shown}{more}")
    fold = np.arange(len(body)) // (2 * per_fold)
    return Pairs(np.array(first), np.array(second), np.array(is_same, bool), fold)


def write_pairs(path: str | pathlib.Path, pairs: Pairs, dataset: Dataset) -> None:
    """Writes pairs in LFW format. Folds must come in order, each with the same number of
    same and different pairs, same pairs first (as `generate_pairs` makes them)."""
    folds = np.unique(pairs.fold)
    per_fold = int(np.sum(pairs.is_same & (pairs.fold == folds[0]))) if len(folds) else 0
    expected_fold = np.repeat(np.arange(len(folds)), 2 * per_fold)
    expected_same = np.tile(np.repeat([True, False], per_fold), len(folds))
    if (per_fold == 0 or not np.array_equal(pairs.fold, expected_fold)
            or not np.array_equal(pairs.is_same, expected_same)):
        raise ValueError("write_pairs needs folds 0..F-1 in order, each with N same pairs then "
                         "N different pairs (the LFW layout)")
    names = [dataset.identity_names[l] for l in dataset.labels]
    numbers = image_numbers(dataset)
    out = [f"{len(folds)}\t{per_fold}"]
    for a, b, same in zip(pairs.first, pairs.second, pairs.is_same):
        if same:
            out.append(f"{names[a]}\t{numbers[a]}\t{numbers[b]}")
        else:
            out.append(f"{names[a]}\t{numbers[a]}\t{names[b]}\t{numbers[b]}")
    pathlib.Path(path).write_text("\n".join(out) + "\n")


def generate_pairs(dataset: Dataset, *, num_folds: int = 10, pairs_per_fold: int = 300,
                   seed: int = 0) -> Pairs:
    """LFW-style pairs: num_folds folds of n same + n different pairs, same pairs first.

    Identities are dealt into folds (identity-disjoint folds) when there are at least
    2 × num_folds identities and every fold then has one identity with 2 images; otherwise
    every fold draws from all identities (no pair repeats). n = pairs_per_fold where the data
    allow, else the largest count every fold can give (logged). Deterministic in the seed.
    """
    if num_folds < 1 or pairs_per_fold < 1:
        raise ValueError(f"num_folds and pairs_per_fold must be >= 1, got {num_folds} and "
                         f"{pairs_per_fold}")
    counts = dataset.counts()
    if dataset.num_identities < 2 or not np.any(counts >= 2):
        raise ValueError(f"pairs need 2 identities and one with 2 images; the dataset has "
                         f"{dataset.num_identities} identities, at most {counts.max(initial=0)}"
                         " images each")
    rng = np.random.default_rng([seed, 0x9A1])
    groups = _fold_groups(counts, num_folds, rng)
    rows_of = [np.flatnonzero(dataset.labels == i) for i in range(dataset.num_identities)]
    if groups is None:  # shared pool: draw all folds' pairs at once so none repeats
        same = _sample_same(rows_of, np.arange(len(counts)), num_folds * pairs_per_fold, rng)
        diff = _sample_different(rows_of, np.arange(len(counts)),
                                 num_folds * pairs_per_fold, rng)
        n = min(len(same), len(diff)) // num_folds
        same_folds = [same[f * n:(f + 1) * n] for f in range(num_folds)]
        diff_folds = [diff[f * n:(f + 1) * n] for f in range(num_folds)]
    else:
        same_folds = [_sample_same(rows_of, g, pairs_per_fold, rng) for g in groups]
        diff_folds = [_sample_different(rows_of, g, pairs_per_fold, rng) for g in groups]
        n = min(min(map(len, same_folds)), min(map(len, diff_folds)))
    if n < pairs_per_fold:
        logging.info("generate_pairs: %d same + %d different pairs per fold (asked for %d)",
                     n, n, pairs_per_fold)
    chosen = [np.concatenate([s[:n], d[:n]]) for s, d in zip(same_folds, diff_folds)]
    both = np.concatenate(chosen).reshape(-1, 2)
    return Pairs(first=both[:, 0], second=both[:, 1],
                 is_same=np.tile(np.repeat([True, False], n), num_folds),
                 fold=np.repeat(np.arange(num_folds), 2 * n))


def _fold_groups(counts: np.ndarray, num_folds: int, rng: np.random.Generator
                 ) -> list[np.ndarray] | None:
    """Identities dealt round-robin (shuffled) into folds, or None when some fold would lack
    a different pair or a same pair."""
    if len(counts) < 2 * num_folds:
        return None
    order = rng.permutation(len(counts))
    groups = [np.sort(order[f::num_folds]) for f in range(num_folds)]
    if any(not np.any(counts[g] >= 2) for g in groups):
        return None
    return groups


def _sample_same(rows_of: list[np.ndarray], identities: np.ndarray, n: int,
                 rng: np.random.Generator) -> np.ndarray:
    """Up to n distinct same-identity pairs [m,2] from the given identities, random order."""
    sizes = np.array([len(rows_of[i]) for i in identities])
    total = int(np.sum(sizes * (sizes - 1) // 2))
    if total <= max(_MAX_ENUMERATED, 4 * n):
        every = np.concatenate([_upper_pairs(rows_of[i]) for i in identities if
                                len(rows_of[i]) >= 2])
        return every[rng.permutation(len(every))[:n]]
    eligible = identities[sizes >= 2]

    def draw(k: int) -> np.ndarray:
        ids = eligible[rng.integers(0, len(eligible), k)]
        picks = [rng.choice(rows_of[i], 2, replace=False) for i in ids]
        return np.sort(np.array(picks), axis=1)
    return _distinct(draw, n)


def _sample_different(rows_of: list[np.ndarray], identities: np.ndarray, n: int,
                      rng: np.random.Generator) -> np.ndarray:
    """Up to n distinct different-identity pairs [m,2] from the given identities."""
    rows = np.concatenate([rows_of[i] for i in identities])
    labels = np.concatenate([np.full(len(rows_of[i]), i) for i in identities])
    total = (len(rows) ** 2 - sum(len(rows_of[i]) ** 2 for i in identities)) // 2
    if total <= max(_MAX_ENUMERATED, 4 * n):
        a, b = np.triu_indices(len(rows), 1)
        keep = labels[a] != labels[b]
        every = np.stack([rows[a[keep]], rows[b[keep]]], 1)
        return every[rng.permutation(len(every))[:n]]

    def draw(k: int) -> np.ndarray:
        a, b = rng.integers(0, len(rows), (2, k))
        keep = labels[a] != labels[b]
        return np.sort(np.stack([rows[a[keep]], rows[b[keep]]], 1), axis=1)
    return _distinct(draw, n)


def _upper_pairs(rows: np.ndarray) -> np.ndarray:
    a, b = np.triu_indices(len(rows), 1)
    return np.stack([rows[a], rows[b]], 1)


def _distinct(draw, n: int) -> np.ndarray:
    """Rejection sampling of n distinct rows (the pool is ≥ 4n, so few draws repeat)."""
    seen: dict[tuple[int, int], None] = {}
    while len(seen) < n:
        for pair in draw(2 * (n - len(seen))):
            seen.setdefault((int(pair[0]), int(pair[1])))
    return np.array(list(seen)[:n]).reshape(-1, 2)
