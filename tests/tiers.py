"""Which parameter cases the fast tier (`-m "not slow"`) runs: see CONTRIBUTING.md."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pytest


def slow_beyond_first(values: Iterable[Any]) -> list[Any]:
    """`values` for `pytest.mark.parametrize` with every case after the first marked slow: the
    fast tier checks the property on one case (e.g. the squared distance), the full suite on
    all."""
    values = list(values)
    return values[:1] + [pytest.param(value, marks=pytest.mark.slow) for value in values[1:]]
