"""Background prefetch: host batches are built ahead in a thread while the device computes."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
_DONE = object()


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


def prefetch(iterable: Iterable[T], buffer_size: int = 2) -> Iterator[T]:
    """Yields the items of `iterable` in order, produced up to `buffer_size` ahead by a daemon
    thread. An exception in the producer is raised here; closing the iterator stops it."""
    if buffer_size < 1:
        raise ValueError(f"prefetch buffer_size must be >= 1, got {buffer_size}")
    items: queue.Queue = queue.Queue(maxsize=buffer_size)
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                items.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in iterable:
                if not put(item):
                    return
        except BaseException as error:  # handed to the consumer, raised there
            put(_Failure(error))
            return
        put(_DONE)

    threading.Thread(target=produce, name="prefetch", daemon=True).start()
    return _consume(items, stop)


def _consume(items: queue.Queue, stop: threading.Event) -> Iterator:
    try:
        while True:
            item = items.get()
            if item is _DONE:
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item
    finally:
        stop.set()
