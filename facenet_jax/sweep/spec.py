"""Sweep files, cells and their names and commands (pure: nothing here runs or writes).

A sweep file's `get_sweep()` returns a dict (or ConfigDict) with
- `base`: the config file every cell starts from: absolute, or relative to the sweep file's
  folder, or (if not found there) relative to the repository root;
- `cells`: a list of dicts of dotted overrides (`grid(...)` builds products);
- optionally `seeds`: each cell is run once per seed (config key `seed`, varied fastest, as
  `grid(..., seeds=...)` does);
- optionally `common`: overrides applied to every cell (e.g. a shorter `num_steps`), left out of
  the cell names and columns but passed on every command line;
- optionally `name`: a title for the results.

A *run* is one cell at one seed: `load_sweep` returns the runs in a fixed order (the cells in
file order, each cell's seeds together), and that order is what `--list` numbers and `--cell I`
picks, so a cluster job array can run a sweep one run per task.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import pathlib
import re
import runpy
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import ml_collections

from facenet_jax.config import json_safe, load_config, pairs_seed

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
SWEEP_KEYS = {"base", "cells", "common", "name", "seeds"}
SEED_KEY = "seed"  # the config key a sweep's seeds set (training only; see data.pairs.seed)
_MAX_NAME = 120
# A cell's model.init_from that names another cell of the sweep (facenet_jax.sweep.stages).
CELL_REFERENCE_PREFIX = "@cell:"
INIT_KEY = "model.init_from"
_SAFE_VALUE = re.compile(r"^[A-Za-z0-9._+-]+$")


def grid(axes: Mapping[str, Sequence[Any]], *, seeds: Sequence[int] | None = None
         ) -> list[dict[str, Any]]:
    """The product of value lists, first key slowest: {"a": [1, 2], "b": [3]} → [{a:1,b:3},
    {a:2,b:3}]; with `seeds`, each combination once per seed (key "seed", varied fastest)."""
    axes = dict(axes)
    if seeds is not None:
        axes[SEED_KEY] = list(seeds)
    for key, values in axes.items():
        if isinstance(values, (str, bytes)) or not len(values):
            raise ValueError(f"grid axis {key!r} needs a non-empty list of values, got "
                             f"{values!r}")
    keys = list(axes)
    return [dict(zip(keys, combination)) for combination in itertools.product(*axes.values())]


def load_sweep(path: str | pathlib.Path) -> dict[str, Any]:
    """Runs the sweep file's `get_sweep()`; checks its keys and cells and resolves `base`.

    Returns {"name", "base" (absolute Path), "cells" (list of dicts: one per run, the seeds
    expanded), "common" (dict)}.
    """
    path = pathlib.Path(path).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"sweep file {path} does not exist")
    spec = runpy.run_path(str(path)).get("get_sweep")
    if spec is None:
        raise ValueError(f"sweep file {path} defines no get_sweep()")
    spec = spec()
    spec = spec.to_dict() if isinstance(spec, ml_collections.ConfigDict) else dict(spec)
    unknown = set(spec) - SWEEP_KEYS
    missing = {"base", "cells"} - set(spec)
    if unknown or missing:
        raise ValueError(f"{path}: get_sweep() must return keys base, cells (and optionally "
                         f"common, name, seeds); unknown: {sorted(unknown)}, missing: "
                         f"{sorted(missing)}")
    cells = [dict(cell) for cell in spec["cells"]]
    if not cells:
        raise ValueError(f"{path}: the sweep has no cells")
    common = dict(spec.get("common") or {})
    for cell in [common, *cells]:
        for key in cell:
            if not isinstance(key, str) or not key:
                raise ValueError(f"{path}: override keys must be dotted strings, got {key!r}")
    if spec.get("seeds") is not None:
        cells = with_seeds(cells, spec["seeds"], where=str(path))
    duplicates = _duplicates(_canonical(cell) for cell in cells)
    if duplicates:
        raise ValueError(f"{path}: cells repeat the same overrides: {duplicates[:3]}; remove "
                         "the repeats (add a seed to repeat a run)")
    try:
        run_sources(cells, common)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
    return {"name": spec.get("name") or path.stem, "base": resolve_base(spec["base"], path),
            "cells": cells, "common": common}


def with_seeds(cells: Sequence[Mapping[str, Any]], seeds: Sequence[int], *, where: str
               ) -> list[dict[str, Any]]:
    """Each cell once per seed, seeds varied fastest (as `grid(..., seeds=...)`)."""
    seeds = list(seeds)
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise ValueError(f"{where}: seeds must be a non-empty list of integers, got {seeds!r}")
    clashing = [cell for cell in cells if SEED_KEY in cell]
    if clashing:
        raise ValueError(f"{where}: cells {clashing[:3]} set {SEED_KEY!r} and the sweep gives "
                         "seeds too; use one or the other")
    return [{**cell, SEED_KEY: seed} for cell in cells for seed in seeds]


def unpinned_pairs_warning(sweep: Mapping[str, Any]) -> str | None:
    """A warning when the runs vary `seed` but not every run pins data.pairs.seed: their test
    pairs then differ by seed, and the spread over seeds mixes pair sampling into training
    noise. None when nothing varies the seed or every run's pairs seed is the same."""
    if len({cell.get(SEED_KEY) for cell in sweep["cells"]}) < 2:
        return None
    seeds = {pairs_seed(cell_config(sweep["base"], sweep["common"], cell))
             for cell in sweep["cells"]}
    if len(seeds) < 2:
        return None
    return ("the runs vary `seed` and with it their evaluation pairs (data.pairs.seed is not "
            "set, so it follows `seed`): the spread over seeds then mixes pair sampling into "
            "training noise. Set data.pairs.seed in the sweep's common overrides (e.g. 0) to "
            "score every seed on the same pairs")


def resolve_base(base: str, sweep_path: pathlib.Path) -> pathlib.Path:
    """`base` as written in the sweep file → an existing absolute config path."""
    candidates = [pathlib.Path(base)] if pathlib.Path(base).is_absolute() else [
        sweep_path.parent / base, REPO_ROOT / base]
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    raise FileNotFoundError(f"sweep base config {base!r} not found (looked at "
                            f"{', '.join(map(str, candidates))})")


def cell_names(cells: Sequence[Mapping[str, Any]]) -> list[str]:
    """Readable, filesystem-safe, unique folder names, one per cell (see `cell_name`); names
    that would still coincide get a hash of their overrides appended."""
    names = [cell_name(cell) for cell in cells]
    repeated = set(_duplicates(names))
    return [f"{name}_{digest(cell)}" if name in repeated else name
            for name, cell in zip(names, cells)]


def cell_name(overrides: Mapping[str, Any]) -> str:
    """{"loss.margin": 0.2, "loss.strategy": "semihard"} → "margin-0.2__strategy-semihard".

    Keys sorted (so the name does not depend on dict order), each shown by its last component
    unless two keys of the cell share it. A value with characters outside [A-Za-z0-9._+-] or
    with "__" (or a name over 120 characters) is made safe and the name gets a hash of the
    overrides, so no two different cells can share a name. No overrides: "base".
    """
    if not overrides:
        return "base"
    keys = sorted(overrides)
    leaves = [key.rsplit(".", 1)[-1] for key in keys]
    shared = set(_duplicates(leaves))
    parts, lossy = [], False
    for key, leaf in zip(keys, leaves):
        text = format_value(overrides[key])
        if text.startswith(CELL_REFERENCE_PREFIX):  # another cell: shown by its name
            text = text[len(CELL_REFERENCE_PREFIX):].replace("__", "+")
        if not _SAFE_VALUE.match(text) or "__" in text:
            text, lossy = re.sub(r"[^A-Za-z0-9.+-]+", "_", text).strip("_"), True
        parts.append(f"{key if leaf in shared else leaf}-{text}")
    name = "__".join(parts)
    if lossy or len(name) > _MAX_NAME:
        name = f"{name[:_MAX_NAME]}_{digest(overrides)}"
    return name


def format_value(value: Any) -> str:
    """An override as the train CLI parses it: strings raw, everything else its repr."""
    if value is None:
        raise ValueError("an override cannot be None (the command line cannot express it)")
    return value if isinstance(value, str) else repr(value)


def train_command(base: pathlib.Path, workdir: pathlib.Path, overrides: Mapping[str, Any],
                  python: str = "python") -> list[str]:
    """The argv that trains one cell (overrides in order; later ones win)."""
    return [python, "-m", "facenet_jax.train", "--config", str(base), "--workdir",
            str(workdir), *(f"--config.{k}={format_value(v)}" for k, v in overrides.items())]


def parse_config_overrides(base: pathlib.Path, args: Sequence[str]) -> dict[str, Any]:
    """Command-line `--config.KEY=VALUE` arguments → {KEY: value}, each value parsed as the
    train CLI parses it (ml_collections' config flag over `base`: by the field's type), so a
    cell's record and its train command agree. ValueError names an argument of another form,
    an unknown key (with ml_collections' "did you mean") or a value of the wrong type."""
    from absl import flags
    from ml_collections import config_flags

    from facenet_jax.cli import flag_error_text

    others = [arg for arg in args if not re.match(r"^--config\.[^=]+=", arg)]
    if others:
        raise ValueError(f"unrecognized arguments: {' '.join(others)} (besides its own flags "
                         "the sweep takes config overrides only, as --config.KEY=VALUE)")
    argv = ["sweep", "--config", str(base), *args]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "the sweep's base config",
                                    flag_values=values, sys_argv=argv)
    try:
        values(argv)
    except (flags.Error, AttributeError, KeyError) as error:
        raise ValueError(flag_error_text(error, argv)) from None
    return dict(config_flags.get_override_values(values["config"]))


def with_overrides(sweep: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """The sweep with `overrides` (e.g. from the command line) added to its common overrides,
    replacing the file's value of a key it sets; they enter every cell's resolved config (and
    so its record: changing one makes the cells it reaches stale). A key some cell sets itself
    is a ValueError: the cell's value would win, or the cells would no longer differ."""
    varied = sorted({key for cell in sweep["cells"] for key in cell} & set(overrides))
    if varied:
        raise ValueError(f"--config.{varied[0]}: the sweep's cells set {', '.join(varied)} "
                         "themselves; change the cells in the sweep file instead")
    return {**sweep, "common": {**sweep["common"], **overrides}}


def cell_config(base: pathlib.Path, common: Mapping[str, Any], cell: Mapping[str, Any]
                ) -> ml_collections.ConfigDict:
    """The config a cell trains with (raises naming an unknown key or a wrong type)."""
    return load_config(base, {**common, **cell})


def list_lines(sweep: Mapping[str, Any]) -> list[str]:
    """What `--list` prints: per run, in the order `--cell` numbers them, "INDEX NAME
    key=value ..." (the run's own overrides; common ones are on every command line), and for a
    run that starts from another (stages.from_cell) " <- after run J"."""
    sources = run_sources(sweep["cells"])
    return [f"{i} {name} " + " ".join(f"{k}={format_value(v)}" for k, v in cell.items())
            + ("" if source is None else f" <- after run {source}")
            for i, (name, cell, source) in enumerate(zip(cell_names(sweep["cells"]),
                                                         sweep["cells"], sources))]


def is_reference(value: Any) -> bool:
    return isinstance(value, str) and value.startswith(CELL_REFERENCE_PREFIX)


def run_sources(cells: Sequence[Mapping[str, Any]], common: Mapping[str, Any] | None = None
                ) -> list[int | None]:
    """Per run (cells with seeds expanded, as load_sweep returns them): the index of the run
    it starts from, or None. ValueError for a reference in `common`, to no cell, to several,
    or to a later cell."""
    if is_reference((common or {}).get(INIT_KEY)):
        raise ValueError(f"{INIT_KEY}={common[INIT_KEY]!r} is in the sweep's common overrides; "
                         "a cell reference belongs in the dependent cells")
    unseeded = [cell_name({k: v for k, v in cell.items() if k != SEED_KEY}) for cell in cells]
    sources: list[int | None] = []
    for i, cell in enumerate(cells):
        reference = cell.get(INIT_KEY)
        if not is_reference(reference):
            sources.append(None)
            continue
        wanted = reference[len(CELL_REFERENCE_PREFIX):]
        matches = [j for j, other in enumerate(cells)
                   if unseeded[j] == wanted and other.get(SEED_KEY) == cell.get(SEED_KEY)]
        if not matches:
            known = sorted(set(unseeded) - {unseeded[i]})
            raise ValueError(f"cell {i} ({cell}) starts from {reference!r}, but no cell at seed "
                             f"{cell.get(SEED_KEY)} is named {wanted!r}; build the reference "
                             f"with from_cell(<that cell's overrides>). Cells: {known[:8]}")
        if len(matches) > 1:
            raise ValueError(f"cell {i} ({cell}): {reference!r} names {len(matches)} runs at seed "
                             f"{cell.get(SEED_KEY)} ({matches}); give the source cell an "
                             "override that tells it apart")
        if matches[0] >= i:
            raise ValueError(f"cell {i} ({cell}) starts from run {matches[0]}, which comes at or "
                             "after it; list the source cell before the cells that start from it")
        sources.append(matches[0])
    return sources


def _canonical(overrides: Mapping[str, Any]) -> str:
    return json.dumps(json_safe(dict(overrides)), sort_keys=True, default=repr)


def digest(overrides: Mapping[str, Any]) -> str:
    """8 hex characters identifying a dict of overrides (or any JSON-able mapping)."""
    return hashlib.sha1(_canonical(overrides).encode()).hexdigest()[:8]


def _duplicates(items: Iterable[str]) -> list[str]:
    seen, repeated = set(), []
    for item in items:
        if item in seen and item not in repeated:
            repeated.append(item)
        seen.add(item)
    return repeated
