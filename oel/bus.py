"""An in-process message bus: the stand-in for Kafka when the whole loop runs in one process (``oel demo``).

Each topic is an append-only list of keyed messages with offsets; each consumer group has its own
position per topic. Values are the same bytes that go over Kafka (``Message.to_bytes()``), and readers
decode them with the same validation (:func:`oel.schemas.decode`), so the demo exercises the wire format
the services use. There is one partition per topic (order is total) and nothing is persisted: a
crash loses the bus, which is fine for a demo whose durable state is the object store.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


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


class BusProducer:
    """confluent-kafka ``Producer``'s interface on an :class:`InProcessBus`, so that the recorder SDK
    (``Recorder(producer=BusProducer(bus))``) encodes and sends the demo's events exactly as it does on
    Kafka. A message is on the bus when ``produce`` returns; its delivery report is served by ``poll``."""

    def __init__(self, bus: InProcessBus):
        self.bus = bus
        self._reports: deque[tuple[Callable[[Any, Any], None] | None, BusMessage]] = deque()
        self._lock = threading.Lock()

    def produce(
        self, topic: str, value: bytes, key: str | bytes | None = None, on_delivery: Callable[[Any, Any], None] | None = None
    ) -> None:
        text_key = key.decode() if isinstance(key, bytes) else key
        with self._lock:  # offset order = report order
            offset = self.bus.publish(topic, text_key, value)
            self._reports.append((on_delivery, BusMessage(topic, offset, text_key, value)))

    def poll(self, timeout: float = 0.0) -> int:
        """Serve the delivery reports waiting (every message is delivered); waits ``timeout`` when there are none."""
        served = 0
        while True:
            with self._lock:
                if not self._reports:
                    break
                callback, msg = self._reports.popleft()
            if callback is not None:
                callback(None, msg)
            served += 1
        if not served and timeout > 0:
            time.sleep(timeout)
        return served

    def flush(self, timeout: float | None = None) -> int:
        self.poll(0)
        return len(self)

    def purge(self, **kwargs: Any) -> None:
        """Nothing to purge: every message is on the bus once produced."""

    def __len__(self) -> int:
        return len(self._reports)
