"""An in-process message bus: the stand-in for Kafka when the whole loop runs in one process (``oel demo``).

Each topic is an append-only list of keyed messages with offsets; each consumer group has its own
position per topic. Values are the same bytes that go over Kafka (``Message.to_bytes()``), and readers
decode them with the same validation (:func:`oel.schemas.decode`), so the demo exercises the wire format
the services use. There is one partition per topic (order is total) and nothing is persisted: a
crash loses the bus, which is fine for a demo whose durable state is the object store.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from dataclasses import dataclass


@dataclass(frozen=True)
class BusMessage:
    """One message as a reader sees it."""

    topic: str
    offset: int
    key: str | None
    value: bytes


class InProcessBus:
    """Topics and consumer-group positions in memory (see the module docstring). Thread-safe."""

    def __init__(self) -> None:
        self._topics: dict[str, list[BusMessage]] = defaultdict(list)
        self._positions: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()

    def publish(self, topic: str, key: str | None, value: bytes) -> int:
        """Append one message; returns its offset."""
        with self._lock:
            log = self._topics[topic]
            log.append(BusMessage(topic, len(log), key, value))
            return len(log) - 1

    def read(self, topic: str, group: str, max_messages: int | None = None) -> list[BusMessage]:
        """The group's next messages on ``topic`` (all that are there, or at most ``max_messages``); the
        group's position moves past them (read = committed: the demo processes each batch synchronously)."""
        with self._lock:
            log = self._topics[topic]
            start = self._positions.get((topic, group), 0)
            end = len(log) if max_messages is None else min(len(log), start + max_messages)
            self._positions[(topic, group)] = end
            return log[start:end]

    def lag(self, topic: str, group: str) -> int:
        """Messages on ``topic`` that ``group`` has not read yet."""
        with self._lock:
            return len(self._topics[topic]) - self._positions.get((topic, group), 0)

    def size(self, topic: str) -> int:
        """Messages ever published on ``topic``."""
        with self._lock:
            return len(self._topics[topic])
