"""oel.logs: a Kafka client's repeated connection failures are one line per window, with a count."""

import logging

from oel.logs import RepeatFilter, client_logger


def _record(msg: str) -> logging.LogRecord:
    return logging.LogRecord("x", logging.ERROR, __file__, 1, msg, None, None)


def test_a_repeated_message_passes_once_per_window_and_then_says_how_often_it_was_held(monkeypatch):
    now = [100.0]
    monkeypatch.setattr("oel.logs.time.monotonic", lambda: now[0])
    f = RepeatFilter(window_s=30)
    assert f.filter(_record("FAIL: connect refused"))
    assert [f.filter(_record("FAIL: connect refused")) for _ in range(200)] == [False] * 200
    assert f.filter(_record("another message"))
    now[0] += 31
    again = _record("FAIL: connect refused")
    assert f.filter(again) and again.getMessage() == "FAIL: connect refused (and 200 more times in the last 30s)"


def test_client_logger_adds_one_filter():
    logger = client_logger("oel.test.client")
    assert client_logger("oel.test.client") is logger
    assert sum(isinstance(f, RepeatFilter) for f in logger.filters) == 1
