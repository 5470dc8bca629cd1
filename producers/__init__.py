"""The agent side of OEL: the trajectory recorder SDK, model-version following, the load generator.

``from producers import Recorder, VersionFollower`` is all an agent needs; see
:mod:`producers.recorder` (the recorder and its episodes) and :mod:`producers.versions` (following
``oel.model-versions``). The names are imported on first use, so importing ``producers.cli`` (done by
``oel --help``) does not load the Kafka client.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "producers.recorder": (
        "ABANDONED_PREFIX",
        "BASE_VERSION",
        "AsyncEpisode",
        "BufferFull",
        "CloseReport",
        "DeliveryFailed",
        "Episode",
        "InvalidEvent",
        "PinnedVersion",
        "Recorder",
        "RecorderClosed",
        "RecorderError",
        "RecorderStats",
        "UndeliveredEvents",
    ),
    "producers.versions": ("VersionFollower", "VersionFollowerError"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)

if TYPE_CHECKING:  # pragma: no cover
    from producers.recorder import (  # noqa: F401
        ABANDONED_PREFIX,
        BASE_VERSION,
        AsyncEpisode,
        BufferFull,
        CloseReport,
        DeliveryFailed,
        Episode,
        InvalidEvent,
        PinnedVersion,
        Recorder,
        RecorderClosed,
        RecorderError,
        RecorderStats,
        UndeliveredEvents,
    )
    from producers.versions import VersionFollower, VersionFollowerError  # noqa: F401


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'producers' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
