"""Name → builder tables (big_vision's registry style, one table per kind).

A kind's table lives in the package that dispatches on it (`models.ENCODERS`,
`data.DATA_SOURCES`, `losses.MINING_STRATEGIES`, `optim.OPTIMIZERS`, `optim.SCHEDULES`,
`evaluators.BENCHMARK_EVALUATORS`, `evaluators.BASELINE_EVALUATORS`); each entry is registered
by the module that defines it, so adding one is a decorator there:

    ENCODERS = Registry("model name")

    @ENCODERS.register("small_cnn")
    def ...

Config validation and every dispatch read the table (`get`, `names`), so the valid names are
written once, where the builders are.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Names of one kind (e.g. "strategy") → items (builders, specs), in registration order.

    `valid` is how an unknown name's error introduces the list ("valid names" by default).
    """

    def __init__(self, kind: str, *, valid: str = "valid names") -> None:
        self.kind = kind
        self._valid = valid
        self._items: dict[str, T] = {}

    def add(self, name: str, item: T) -> T:
        """Registers `item` as `name`; ValueError when the name is taken (no silent
        replacement: two modules claiming one name is a bug)."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {self.kind} needs a non-empty string name, got {name!r}")
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} is already registered "
                             f"(by {self._items[name]!r}); choose another name")
        self._items[name] = item
        return item

    def register(self, name: str) -> Callable[[T], T]:
        """A decorator: `@registry.register("name")` adds what it decorates, unchanged."""
        return lambda item: self.add(name, item)

    def get(self, name: str, *, key: str | None = None) -> T:
        """The item called `name`. ValueError for an unknown one, naming it (as `key`, e.g. the
        config key "model.name", else as the kind) and every valid name."""
        try:
            return self._items[name]
        except (KeyError, TypeError):  # TypeError: an unhashable "name" (e.g. a list)
            raise ValueError(f"unknown {key or self.kind} {name!r}; {self._valid}: "
                             f"{', '.join(self._items)}") from None

    def names(self) -> tuple[str, ...]:
        """Every registered name, in registration order."""
        return tuple(self._items)

    def __contains__(self, name: object) -> bool:
        try:
            return name in self._items
        except TypeError:
            return False

    def remove(self, name: str) -> T:
        """Unregisters `name` (KeyError if absent) and returns its item."""
        return self._items.pop(name)

    @contextlib.contextmanager
    def temporary(self, name: str, item: T) -> Iterator[T]:
        """Registers `item` as `name` inside a `with` block only (tests, notebooks)."""
        self.add(name, item)
        try:
            yield item
        finally:
            self.remove(name)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self._items)})"
