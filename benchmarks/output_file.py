"""Where a benchmark script writes: the path it is given, and never over an existing file (the
committed benchmarks/results/ above all) unless `--overwrite` says so. Checked right after the
arguments are parsed, before anything is measured.

    add_output_arguments(parser, default)            # --output PATH (default) and --overwrite
    args = parser.parse_args(argv)
    refuse_existing(parser, [args.output], args.overwrite)
"""

from __future__ import annotations

import argparse
import pathlib
from collections.abc import Iterable


def add_output_arguments(parser: argparse.ArgumentParser, default: str | pathlib.Path, *,
                         flag: str = "--output", what: str = "output JSON") -> None:
    """Adds FLAG (default `default`) and --overwrite to `parser`."""
    parser.add_argument(flag, default=str(default),
                        help=f"{what} (default {default}; an existing one is refused unless "
                             "--overwrite)")
    parser.add_argument("--overwrite", action="store_true",
                        help=f"replace an existing {flag} (e.g. the committed results)")


def refuse_existing(parser: argparse.ArgumentParser, paths: Iterable[str | pathlib.Path],
                    overwrite: bool, *, flag: str = "--output") -> None:
    """Exits through `parser.error` (status 2, one line naming the files) when one of `paths`
    exists and `overwrite` is False; does nothing otherwise."""
    existing = [str(path) for path in paths if pathlib.Path(path).exists()]
    if existing and not overwrite:
        parser.error(f"{', '.join(existing)} already exist{'s' if len(existing) == 1 else ''}: "
                     f"give another {flag}, or --overwrite to replace it")
