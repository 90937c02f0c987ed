"""Verification pairs in LFW's pairs.txt format: reading, writing and generating them.

Format: a header `N_folds N_per_fold` (or one number: a single fold), then per fold N_per_fold
same-identity lines `name n1 n2` and N_per_fold different-identity lines `name1 n1 name2 n2`.
Image number n of identity `name` is the file whose stem is `name_%04d` (LFW) or the number
itself (ORL: `s1/3.pgm`); for identities none of whose stems is a number (Yale B) and for
generated data without files, n is the 1-based position of the image in the dataset's order.
An identity with some numbered and some unnumbered stems, or with a number twice, is a
ValueError naming its files (its numbers would otherwise point at the wrong images).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import pathlib
import re
from collections.abc import Sequence

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


def restrict_to_pair_identities(dataset: Dataset, pairs: Pairs) -> tuple[Dataset, Pairs]:
    """The images of the identities `pairs` names (dataset order, labels re-indexed) and the
    pairs re-indexed into them: everything that scoring the pairs, and identification over
    their identities, reads. Embedding a big folder for one fold's pairs embeds only these."""
    named = np.concatenate([pairs.first, pairs.second])
    identities = np.unique(dataset.labels[named]) if len(named) else np.zeros(0, np.int64)
    kept = dataset.subset(identities)
    rows = np.flatnonzero(np.isin(dataset.labels, identities))
    position = np.full(len(dataset.labels), -1, np.int64)
    position[rows] = np.arange(len(rows))
    return kept, dataclasses.replace(pairs, first=position[pairs.first],
                                     second=position[pairs.second])


def image_numbers(dataset: Dataset, identities: Sequence[int] | None = None) -> np.ndarray:
    """The LFW image number of every image, int [N] (see the module docstring).

    Only the images of `identities` (default: all) are numbered, the others get 0: a badly
    numbered identity is an error only where a pairs file uses it.
    """
    numbers = np.zeros(len(dataset.labels), np.int64)
    for identity in range(dataset.num_identities) if identities is None else identities:
        rows = np.flatnonzero(dataset.labels == identity)
        numbers[rows] = (range(1, len(rows) + 1) if dataset.paths is None else
                         _file_numbers(dataset.identity_names[identity],
                                       [dataset.paths[r] for r in rows]))
    return numbers


def _file_numbers(name: str, files: Sequence[str]) -> list[int]:
    """One identity's image numbers, in the order of its files: the numbers of their stems, or
    1-based positions when no stem is numbered; ValueError when that is ambiguous."""
    pattern = re.compile(rf"(?:{re.escape(name)}_)?(\d+)")
    matches = [pattern.fullmatch(pathlib.PurePath(f).stem) for f in files]
    if not any(matches):
        return list(range(1, len(files) + 1))
    numbers = [int(m.group(1)) if m else None for m in matches]
    repeated = {n for n, count in collections.Counter(numbers).items() if count > 1}
    offending = [pathlib.PurePath(f).name for f, n in zip(files, numbers)
                 if n is None or n in repeated]
    if offending:
        shown = ", ".join(offending[:20]) + (" ..." if len(offending) > 20 else "")
        raise ValueError(
            f"identity {name!r}: pairs number its images by the number in each file name "
            f"({name}_0001.jpg or 1.pgm), but {len(offending)} of its {len(files)} files are "
            f"unnumbered or repeat a number, so a pair could resolve to the wrong image: "
            f"{shown}. Rename or move out these files so every file of {name!r} has its own "
            "number (or none has one: then images are numbered by position)")
    return numbers


ParsedPair = tuple[int, tuple[tuple[str, int], tuple[str, int]], bool]


def parse_pairs_file(path: str | pathlib.Path) -> tuple[int, list[ParsedPair]]:
    """The one parser of the pairs format (read_pairs and the split's exclude_pairs_file use it).

    Returns (pairs per fold × 2, [(line number, ((name, n), (name, n)), is_same)] in file
    order). A bad header, a wrong line count, a line without 3 or 4 fields or a non-integer
    image number is a ValueError naming the line.
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
    return 2 * per_fold, [(line_no, _pair_fields(fields, f"{path}:{line_no}"), len(fields) == 3)
                          for line_no, fields in body]


def read_pairs(path: str | pathlib.Path, dataset: Dataset) -> Pairs:
    """Reads a pairs.txt against `dataset`; fold of each pair by position (file order).

    Malformed lines raise ValueError with their line number; pairs whose images are not in the
    dataset raise one FileNotFoundError listing every missing image.
    """
    pairs_per_fold, parsed = parse_pairs_file(path)
    identity_of = {name: i for i, name in enumerate(dataset.identity_names)}
    named = sorted({identity_of[name] for _, pair, _ in parsed for name, _ in pair
                    if name in identity_of})
    numbers = image_numbers(dataset, named)  # only the named identities must be well numbered
    lookup = {(dataset.identity_names[dataset.labels[i]], int(numbers[i])): int(i)
              for i in np.flatnonzero(np.isin(dataset.labels, named))}
    missing = [f"{name}/{name}_{number:04d}.* (line {line_no})" for line_no, pair, _ in parsed
               for name, number in pair if (name, number) not in lookup]
    if missing:
        shown = "\n  ".join(missing[:50])
        more = f"\n  ... and {len(missing) - 50} more" if len(missing) > 50 else ""
        raise FileNotFoundError(f"{path}: {len(missing)} paired images are not in the dataset "
                                f"(is the pairs file for this folder?):\n  {shown}{more}")
    first, second = (np.array([lookup[pair[k]] for _, pair, _ in parsed]) for k in (0, 1))
    is_same = np.array([same for _, _, same in parsed])
    fold = np.arange(len(parsed)) // pairs_per_fold
    return Pairs(first, second, is_same, fold)


def _pair_fields(fields: list[str], where: str) -> tuple[tuple[str, int], tuple[str, int]]:
    """One pairs.txt line's two images as (name, number): `name n1 n2` or `name1 n1 name2 n2`."""
    if len(fields) not in (3, 4):
        raise ValueError(f"{where}: expected 3 fields (same) or 4 (different), "
                         f"got {len(fields)}: {' '.join(fields)!r}")
    a = (fields[0], fields[1])
    b = (fields[0], fields[2]) if len(fields) == 3 else (fields[2], fields[3])
    for _, number in (a, b):
        if not number.isdigit():
            raise ValueError(f"{where}: image number {number!r} is not an integer")
    return (a[0], int(a[1])), (b[0], int(b[1]))


def write_pairs(path: str | pathlib.Path, pairs: Pairs, dataset: Dataset) -> None:
    """Writes pairs in LFW format. Folds must come in order, each with the same number of
    same and different pairs, same pairs first (as `generate_pairs` makes them). Identity names
    with whitespace (or empty) are a ValueError: the format could not be read back."""
    folds = np.unique(pairs.fold)
    per_fold = int(np.sum(pairs.is_same & (pairs.fold == folds[0]))) if len(folds) else 0
    expected_fold = np.repeat(np.arange(len(folds)), 2 * per_fold)
    expected_same = np.tile(np.repeat([True, False], per_fold), len(folds))
    if (per_fold == 0 or not np.array_equal(pairs.fold, expected_fold)
            or not np.array_equal(pairs.is_same, expected_same)):
        raise ValueError("write_pairs needs folds 0..F-1 in order, each with N same pairs then "
                         "N different pairs (the LFW layout)")
    used = np.unique(dataset.labels[np.r_[pairs.first, pairs.second]])
    spaced = [dataset.identity_names[i] for i in used
              if dataset.identity_names[i].split() != [dataset.identity_names[i]]]
    if spaced:
        raise ValueError(f"write_pairs: identity names {spaced[:5]} contain whitespace, but the "
                         "pairs format separates fields by whitespace, so the file could not be "
                         "read back; rename these identities (e.g. spaces to underscores)")
    names = [dataset.identity_names[l] for l in dataset.labels]
    numbers = image_numbers(dataset, np.unique(dataset.labels[np.r_[pairs.first, pairs.second]]))
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
    2 × num_folds identities and every fold then has two identities with images, one of them
    with 2; otherwise every fold draws from all identities (no pair repeats). n = pairs_per_fold
    where the data allow, else the largest count every fold can give (logged). Deterministic in
    the seed. ValueError when the dataset has fewer than num_folds same-identity pairs or
    different-identity pairs in all (a fold would get none).
    """
    if num_folds < 1 or pairs_per_fold < 1:
        raise ValueError(f"num_folds and pairs_per_fold must be >= 1, got {num_folds} and "
                         f"{pairs_per_fold}")
    counts = dataset.counts()
    same_total, different_total = _pair_totals(counts)
    if min(same_total, different_total) < num_folds:
        raise ValueError(_too_few_pairs(counts, same_total, different_total, num_folds))
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
        # evaluate.generated_pairs logs the count with the split's name
        logging.debug("generate_pairs: %d same + %d different pairs per fold (asked for %d)",
                     n, n, pairs_per_fold)
    chosen = [np.concatenate([s[:n], d[:n]]) for s, d in zip(same_folds, diff_folds)]
    both = np.concatenate(chosen).reshape(-1, 2)
    return Pairs(first=both[:, 0], second=both[:, 1],
                 is_same=np.tile(np.repeat([True, False], n), num_folds),
                 fold=np.repeat(np.arange(num_folds), 2 * n))


def _pair_totals(counts: np.ndarray) -> tuple[int, int]:
    """(same-identity, different-identity) image pairs of identities with these image counts."""
    counts = np.asarray(counts, np.int64)
    return (int(np.sum(counts * (counts - 1) // 2)),
            int((np.sum(counts) ** 2 - np.sum(counts ** 2)) // 2))


def _too_few_pairs(counts: np.ndarray, same_total: int, different_total: int,
                   num_folds: int) -> str:
    """Why `num_folds` folds are impossible, with the config keys that fix it."""
    lower = (f"lower data.pairs.num_folds to {min(same_total, different_total)} or less, "
             if min(same_total, different_total) else "")
    return (f"generate_pairs: each of the {num_folds} folds needs a same-identity and a "
            f"different-identity pair, but the {len(counts)} identities and {np.sum(counts)} "
            f"images of this split ({np.sum(counts >= 2)} identities with 2 or more images, at "
            f"most {counts.max(initial=0)} each) give only {same_total} same-identity and "
            f"{different_total} different-identity pairs: {lower}give the split more "
            "identities (data.split.* fractions or identity files) or use more images per "
            "identity (e.g. data.synthetic.images_per_identity)")


def _fold_groups(counts: np.ndarray, num_folds: int, rng: np.random.Generator
                 ) -> list[np.ndarray] | None:
    """Identities dealt round-robin (shuffled) into folds, or None when some fold would lack
    a different pair (two identities with images) or a same pair (one with 2 images)."""
    if len(counts) < 2 * num_folds:
        return None
    order = rng.permutation(len(counts))
    groups = [np.sort(order[f::num_folds]) for f in range(num_folds)]
    if any(np.sum(counts[g] >= 1) < 2 or not np.any(counts[g] >= 2) for g in groups):
        return None
    return groups


def _sample_same(rows_of: list[np.ndarray], identities: np.ndarray, n: int,
                 rng: np.random.Generator) -> np.ndarray:
    """Up to n distinct same-identity pairs [m,2] from the given identities, random order."""
    sizes = np.array([len(rows_of[i]) for i in identities])
    total, _ = _pair_totals(sizes)
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
    _, total = _pair_totals(np.array([len(rows_of[i]) for i in identities]))
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
