"""Logging helpers: loggers for clients (Kafka) whose connection failures repeat many times a second while a broker is down."""

from __future__ import annotations

import logging
import threading
import time


class RepeatFilter(logging.Filter):
    """Lets each distinct message through once per ``window_s``; the next one let through says how many
    were held back meanwhile (a broker that is down is one line every few seconds, not hundreds)."""

    def __init__(self, window_s: float = 30.0):
        super().__init__()
        self.window_s = window_s
        self._seen: dict[str, tuple[float, int]] = {}
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        key = record.getMessage()
        now = time.monotonic()
        with self._lock:
            last, held = self._seen.get(key, (None, 0))
            if last is not None and now - last < self.window_s:
                self._seen[key] = (last, held + 1)
                return False
            if len(self._seen) > 1000:
                self._seen.clear()
            self._seen[key] = (now, 0)
        if held:
            record.msg, record.args = f"{key} (and {held} more times in the last {self.window_s:.0f}s)", None
        return True


def client_logger(name: str, window_s: float = 30.0) -> logging.Logger:
    """The logger to hand a confluent-kafka client as ``logger``: repeats are held back (:class:`RepeatFilter`)."""
    logger = logging.getLogger(name)
    if not any(isinstance(f, RepeatFilter) for f in logger.filters):
        logger.addFilter(RepeatFilter(window_s))
    return logger
