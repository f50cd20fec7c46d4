"""Producing the next items in a background thread while the caller works on the current one (reading and
tokenising text beside the capture's forward passes, gathering rows beside a training step)."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Prefetcher(Generic[T]):
    """Iterates ``items`` in a background thread, up to ``depth`` items ahead; ``depth`` 0 iterates in the
    caller's thread. The items and their order do not depend on timing. An exception raised while producing
    an item is raised in the caller when it reaches that item. Use as a context manager, or call ``close``:
    the thread then stops at its next item.
    """

    def __init__(self, items: Iterable[T], depth: int = 2, name: str = "llama3-sae-prefetch"):
        self._items = iter(items)
        self._done = object()
        self._queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._ended: BaseException | None = None
        if depth > 0:
            self._thread = threading.Thread(target=self._work, name=name, daemon=True)
            self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _work(self) -> None:
        try:
            for item in self._items:
                if not self._put(("ok", item)):
                    return
            self._put(("ok", self._done))
        except BaseException as e:  # handed to the consumer, which re-raises it
            self._put(("error", e))

    def __iter__(self) -> Iterator[T]:
        return self

    def __next__(self) -> T:
        if self._thread is None:
            return next(self._items)
        if self._ended is not None:  # the worker has stopped: keep ending the same way
            raise self._ended
        kind, value = self._queue.get()
        if kind == "error":
            self._ended = value
            raise value
        if value is self._done:
            self._ended = StopIteration()
            raise self._ended
        return value

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> "Prefetcher[T]":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
