"""The model-version protocol: what the messages on the compacted ``oel.model-versions`` topic mean.

The topic holds :class:`~oel.schemas.ModelVersion` messages keyed by namespace; compaction keeps the
last one. Followers (the agents' :class:`producers.versions.VersionFollower`, the in-process demo) read
a namespace's messages in topic order through :class:`VersionState`; the last one decides:

* ``promoted``: this version becomes current;
* ``rolled_back`` / ``rejected`` of the *current* version: fall back to its ``parent_version`` if that
  was seen promoted and is not itself bad, else to the newest good promoted version seen, else to
  the base model (``current`` is None; agents record :data:`BASE_VERSION`); of any other version:
  nothing changes (a rejected candidate never served);
* ``candidate``: ignored (not serving yet);
* a tombstone (null value): the namespace has no version; the base model.

Publishers (the learner's registry): because compaction keeps only the last message per namespace, the
last message must be the version to serve. A rollback is therefore two messages
(:func:`rollback_events`): the bad version as ``rolled_back``, then the good one republished as
``promoted``, which simply wins, also for followers that start after compaction. Candidates are never
published. The Kafka publisher is :func:`oel.ops.versions.publish_version`.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from oel.schemas import ModelVersion, VersionStatus

log = logging.getLogger(__name__)

BASE_VERSION = "base"
"""The version name of the base model: what agents record while a namespace has no promoted version,
and the parent of a first round."""


class VersionTopicError(RuntimeError):
    """The model-versions topic could not be read or written (missing topic, broker down)."""


def version_name(version: ModelVersion | None) -> str:
    """The name of ``version``; :data:`BASE_VERSION` for None (the base model)."""
    return version.version if version is not None else BASE_VERSION


class VersionState:
    """The rules of the module docstring as plain state: feed it a namespace's messages in topic order
    (:meth:`apply`); :attr:`current` is the version to serve (None = the base model). The Kafka
    follower and the in-process demo both use it."""

    def __init__(self, namespace: str):
        self.namespace = namespace
        self.current: ModelVersion | None = None
        self._promoted: list[ModelVersion] = []  # every promoted message seen, in order
        self._bad: set[str] = set()  # versions rolled back or rejected (until promoted again)

    def apply(self, version: ModelVersion | None) -> tuple[ModelVersion | None, ModelVersion | None]:
        """Take one message (None = a tombstone); returns (old current, new current)."""
        old = self.current
        if version is None:
            new = None
        elif version.status is VersionStatus.promoted:
            self._bad.discard(version.version)
            self._promoted.append(version)
            new = version
        elif version.status in (VersionStatus.rolled_back, VersionStatus.rejected):
            self._bad.add(version.version)
            new = self._fallback(version) if old is not None and old.version == version.version else old
        else:  # candidate: not serving yet
            new = old
        self.current = new
        return old, new

    def _fallback(self, bad: ModelVersion) -> ModelVersion | None:
        good = [v for v in self._promoted if v.version not in self._bad]
        for v in reversed(good):
            if v.version == bad.parent_version:
                return v
        if good:
            return good[-1]
        log.warning(
            "%s: version %s was %s and no earlier good version is known; falling back to the base model",
            self.namespace,
            bad.version,
            bad.status.value,
        )
        return None


def rollback_events(bad: ModelVersion, to: ModelVersion, reason: str) -> tuple[ModelVersion, ModelVersion]:
    """The two messages of a rollback, in publishing order: ``bad`` as rolled_back, then ``to`` as promoted."""
    if bad.namespace != to.namespace:
        raise ValueError(f"cannot roll {bad.namespace} back to a version of {to.namespace}")
    if bad.version == to.version:
        raise ValueError(f"cannot roll {bad.version} back to itself")
    rolled = bad.model_copy(update={"status": VersionStatus.rolled_back, "reason": reason, "ts": _now()})
    again = to.model_copy(update={"status": VersionStatus.promoted, "reason": f"rollback of {bad.version}: {reason}", "ts": _now()})
    return rolled, again


def _now() -> datetime:
    return datetime.now(UTC)
