"""When does a namespace get a consolidation round? The learner's trigger policy, as pure data and functions.

The learner reads :class:`~oel.schemas.ExperienceUpdate` messages (one per KB append). Per namespace the
policy remembers which KB versions it has seen (an update delivered twice counts once), which item ids
are new since the last *consolidated* KB version (the KB version the current model was trained on),
and when the last round started. A round is due when both hold:

* at least ``min_new_items`` new items arrived since the last consolidated KB version, and
* ``cooldown_s`` seconds passed since the last round of the namespace started.

The round then consolidates the newest KB version seen. Its id is a hash of the namespace, the parent
model version (the one the round continues from; ``None`` = the base model) and that KB version, so a
learner restarted after a crash computes the same id and the model registry finds the work already done
(``learner.versions``). Time is always passed in (``now``, Unix seconds): nothing here reads a clock.

Example::

    policy = TriggerPolicy(min_new_items=8, cooldown_s=600)
    policy.restore("shop", parent_version=None, consolidated_kb_version=None, last_round_at=None)
    policy.observe(update)                       # False for a duplicate
    trigger = policy.due("shop", now=time.time())
    if trigger:
        policy.round_started(trigger, now)
        ...                                      # run the round, record its version
        policy.round_finished(trigger, new_version="g0001-...")
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

from oel.schemas import ExperienceUpdate
from oel.versions import BASE_VERSION

_KB_SEQ = re.compile(r"^(\d+)-")


def kb_seq(kb_version: str | None) -> int | None:
    """The sequence number of a KB version (``000012-ab34...`` -> 12), or None if it carries none."""
    if kb_version is None:
        return None
    m = _KB_SEQ.match(kb_version)
    return int(m.group(1)) if m else None


def round_id(namespace: str, parent_version: str | None, kb_version: str) -> str:
    """Deterministic id of the round that trains ``kb_version`` into the weights, on top of ``parent_version``.

    24 hex characters of sha256 over ``namespace|parent|kb_version`` (``base`` for no parent)."""
    text = f"{namespace}|{parent_version or BASE_VERSION}|{kb_version}"
    return hashlib.sha256(text.encode()).hexdigest()[:24]


@dataclass(frozen=True)
class RoundTrigger:
    """A round that is due: which namespace, on top of which model, consolidating which KB version."""

    namespace: str
    round_id: str
    parent_version: str | None
    """The model version the round continues from (``None`` = the base model)."""
    kb_version: str
    """The newest KB version seen: the one the round consolidates."""
    kb_versions: tuple[str, ...]
    """Every KB version seen since the last consolidated one, oldest first (``kb_version`` is the last)."""
    new_items: int
    """Distinct new item ids since the last consolidated KB version."""


@dataclass
class NamespaceState:
    """What the policy remembers about one namespace."""

    namespace: str
    parent_version: str | None = None
    """The model version the next round continues from (the service sets the currently promoted one)."""
    consolidated_kb_version: str | None = None
    """The KB version the newest model version was trained on."""
    last_round_at: float | None = None
    """Unix time the last round started (for the cool-down)."""
    pending: dict[str, list[str]] = field(default_factory=dict)
    """KB version -> its new item ids, for updates after the consolidated version, in arrival order."""
    seen: set[str] = field(default_factory=set)
    """Every KB version observed (duplicates are dropped by this)."""

    @property
    def new_item_ids(self) -> list[str]:
        out: list[str] = []
        seen: set[str] = set()
        for ids in self.pending.values():
            for i in ids:
                if i not in seen:
                    seen.add(i)
                    out.append(i)
        return out

    @property
    def newest_kb_version(self) -> str | None:
        """The newest pending KB version (the one a round now would consolidate)."""
        return _newest(list(self.pending)) if self.pending else None


class TriggerPolicy:
    """Per-namespace trigger state and the decision when a round starts (see the module docstring)."""

    def __init__(self, min_new_items: int, cooldown_s: float):
        if min_new_items < 1:
            raise ValueError(f"min_new_items must be >= 1, got {min_new_items}")
        if cooldown_s < 0:
            raise ValueError(f"cooldown_s must be >= 0, got {cooldown_s}")
        self.min_new_items = min_new_items
        self.cooldown_s = cooldown_s
        self._states: dict[str, NamespaceState] = {}

    @classmethod
    def from_settings(cls, learner_settings) -> TriggerPolicy:
        """From :class:`oel.settings.LearnerSettings` (``min_new_items``, ``cooldown_s``)."""
        return cls(learner_settings.min_new_items, learner_settings.cooldown_s)

    def state(self, namespace: str) -> NamespaceState:
        """The namespace's state (created empty on first use)."""
        if namespace not in self._states:
            self._states[namespace] = NamespaceState(namespace)
        return self._states[namespace]

    @property
    def namespaces(self) -> list[str]:
        return sorted(self._states)

    def restore(
        self,
        namespace: str,
        *,
        parent_version: str | None,
        consolidated_kb_version: str | None,
        last_round_at: float | None,
    ) -> NamespaceState:
        """Set what the model registry says (at start-up): the newest version, the KB version it was
        trained on, and when its round ran. Pending updates already observed and older than the
        consolidated version are dropped."""
        st = self.state(namespace)
        st.parent_version = parent_version
        st.consolidated_kb_version = consolidated_kb_version
        st.last_round_at = last_round_at
        self._drop_consolidated(st)
        return st

    def observe(self, update: ExperienceUpdate) -> bool:
        """Take one update into account; False if it changes nothing (a duplicate, or a KB version that
        is already consolidated)."""
        st = self.state(update.namespace)
        if update.kb_version in st.seen:
            return False
        st.seen.add(update.kb_version)
        if self._is_consolidated(st, update.kb_version):
            return False
        st.pending[update.kb_version] = list(update.new_item_ids)
        return True

    def new_items(self, namespace: str) -> int:
        """Distinct new item ids since the namespace's last consolidated KB version."""
        return len(self.state(namespace).new_item_ids)

    def cooldown_left(self, namespace: str, now: float) -> float:
        """Seconds until the cool-down of the namespace ends (0 when it has)."""
        last = self.state(namespace).last_round_at
        return 0.0 if last is None else max(0.0, last + self.cooldown_s - now)

    def due(self, namespace: str, now: float) -> RoundTrigger | None:
        """The round to start now, or None (too few new items, or still cooling down)."""
        st = self.state(namespace)
        n = len(st.new_item_ids)
        if n < self.min_new_items or self.cooldown_left(namespace, now) > 0:
            return None
        kb = _newest(list(st.pending))
        return RoundTrigger(
            namespace=namespace,
            round_id=round_id(namespace, st.parent_version, kb),
            parent_version=st.parent_version,
            kb_version=kb,
            kb_versions=tuple(_ordered(list(st.pending))),
            new_items=n,
        )

    def all_due(self, now: float) -> list[RoundTrigger]:
        """Every namespace's due round, by namespace name."""
        return [t for ns in self.namespaces if (t := self.due(ns, now)) is not None]

    def round_started(self, trigger: RoundTrigger, now: float) -> None:
        """Start the cool-down of the trigger's namespace."""
        self.state(trigger.namespace).last_round_at = now

    def round_finished(self, trigger: RoundTrigger, new_version: str | None) -> None:
        """The round's outcome is recorded: its KB version is consolidated; ``new_version`` (None when the
        round produced none, e.g. rejected) becomes the parent of the next round."""
        st = self.state(trigger.namespace)
        st.consolidated_kb_version = trigger.kb_version
        if new_version is not None:
            st.parent_version = new_version
        self._drop_consolidated(st)

    # --- helpers ------------------------------------------------------------------------------

    def _is_consolidated(self, st: NamespaceState, kb_version: str) -> bool:
        done = st.consolidated_kb_version
        if done is None:
            return False
        if kb_version == done:
            return True
        a, b = kb_seq(kb_version), kb_seq(done)
        return a is not None and b is not None and a <= b

    def _drop_consolidated(self, st: NamespaceState) -> None:
        done = st.consolidated_kb_version
        if done is None:
            return
        if done in st.pending and kb_seq(done) is None:
            # No sequence numbers to compare: arrival order decides; drop up to and including it.
            keys = list(st.pending)
            for k in keys[: keys.index(done) + 1]:
                del st.pending[k]
            return
        for k in [k for k in st.pending if self._is_consolidated(st, k)]:
            del st.pending[k]


def _ordered(versions: list[str]) -> list[str]:
    """KB versions oldest first: by sequence number when all have one, else in arrival order."""
    seqs = [kb_seq(v) for v in versions]
    if all(s is not None for s in seqs):
        return [v for _, _, v in sorted(zip(seqs, range(len(versions)), versions))]
    return list(versions)


def _newest(versions: list[str]) -> str:
    return _ordered(versions)[-1]
