"""The agent SDK: the trajectory recorder, model-version following and adapter loading.

``from producers import Recorder, VersionFollower`` is all an agent needs; see
:mod:`producers.recorder` (the recorder and its episodes), :mod:`producers.versions` (following
``oel.model-versions``) and :mod:`producers.adapters` (loading a version's adapter). The names are
imported on first use, so importing this package does not load the Kafka client.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "producers.adapters": ("AdapterLoader",),
    "oel.versions": ("BASE_VERSION",),
    "producers.recorder": (
        "ABANDONED_PREFIX",
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
    from oel.versions import BASE_VERSION  # noqa: F401
    from producers.adapters import AdapterLoader  # noqa: F401
    from producers.recorder import (  # noqa: F401
        ABANDONED_PREFIX,
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
