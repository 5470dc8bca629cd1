"""The learner's core, free of any transport: experience updates in, consolidation rounds out.

:class:`Consolidator` is what both the Kafka learner service (:mod:`learner.service`) and the
one-machine demo (:mod:`recipes.demo`) run: each feeds it the :class:`~oel.schemas.ExperienceUpdate`
messages it reads and asks it for due rounds; the consolidator

* restores a namespace from the model registry the first time it sees it (the newest version, the KB
  version that version consolidated and when its round ran; a version left as a bare candidate by a
  crash right after its manifest gets its remaining steps — gate, promotion — at once),
* applies the :class:`~learner.policy.TriggerPolicy` (enough new items, cool-down),
* runs a due round with the :class:`~learner.rounds.RoundRunner` and records its outcome: the KB
  version counts as consolidated whatever the outcome (it is not retrained), and the next round
  continues from what is served (a rejected or rolled-back candidate is no parent),
* backs off after a failed round (``retry_s``) rather than retrying in a tight loop.

It keeps no offsets: when a transport may acknowledge an update is the transport's business (the service
commits only after the round that consumed it is recorded).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from learner.policy import RoundTrigger, TriggerPolicy
from learner.rounds import RoundOutcome, RoundRunner
from learner.versions import ModelRegistry
from oel import metrics
from oel.schemas import ExperienceUpdate, ModelVersion

log = logging.getLogger(__name__)

FAILED_ROUND_RETRY_S = 60.0
"""How long a namespace waits after a failed round before the next attempt."""


class Consolidator:
    """Decides and runs consolidation rounds (see the module docstring). ``clock`` returns Unix seconds."""

    def __init__(
        self,
        runner: RoundRunner,
        policy: TriggerPolicy,
        *,
        clock: Callable[[], float] = time.time,
        retry_s: float = FAILED_ROUND_RETRY_S,
        published: Callable[[str], ModelVersion | None] | None = None,
    ):
        self.runner = runner
        self.published = published
        self.registry: ModelRegistry = runner.registry
        self.policy = policy
        self.clock = clock
        self.retry_s = retry_s
        self.rounds: list[RoundOutcome] = []
        self._restored: set[str] = set()
        self._retry_at: dict[str, float] = {}

    def observe(self, update: ExperienceUpdate) -> bool:
        """Take one update into account; False when it changes nothing (a duplicate, or already consolidated)."""
        if update.namespace not in self._restored:
            self.restore(update.namespace)
        return self.policy.observe(update)

    def restore(self, namespace: str) -> None:
        """Set the namespace's state from the registry (see the module docstring)."""
        metrics.init_namespace(namespace)
        latest = self.registry.latest(namespace)
        if latest is not None:
            m = latest.manifest
            if not latest.history:
                # A crash right after the manifest: the round's remaining steps (gate, promotion) run now,
                # knowing what was published already (the crash may have come between publishing and recording).
                self.runner.finish(latest, self.published(namespace) if self.published is not None else None)
            self.policy.restore(
                namespace,
                parent_version=self.parent(namespace),
                consolidated_kb_version=m.kb_version,
                last_round_at=m.created_at.timestamp(),
            )
        self._restored.add(namespace)

    def parent(self, namespace: str) -> str | None:
        """The parent of the namespace's next round: its current (promoted) version; None = the base model."""
        current = self.registry.current(namespace)
        return current.manifest.version if current is not None else None

    def due(self) -> list[RoundTrigger]:
        """The rounds due now (none for a namespace still backing off after a failure)."""
        now = self.clock()
        return [t for t in self.policy.all_due(now) if self._retry_at.get(t.namespace, 0.0) <= now]

    def run_round(self, trigger: RoundTrigger) -> RoundOutcome | None:
        """Run one due round and record its outcome; None when it failed (logged; retried after ``retry_s``)."""
        ns = trigger.namespace
        now = self.clock()
        self.policy.round_started(trigger, now)
        try:
            outcome = self.runner.run(trigger)
        except Exception:
            log.exception("%s: round %s failed; retrying in %.0f s at the earliest", ns, trigger.round_id, self.retry_s)
            self._retry_at[ns] = now + self.retry_s
            return None
        self._retry_at.pop(ns, None)
        self.policy.round_finished(trigger, None)
        st = self.policy.state(ns)
        self.policy.restore(ns, parent_version=self.parent(ns), consolidated_kb_version=trigger.kb_version, last_round_at=st.last_round_at)
        self.rounds.append(outcome)
        return outcome

    def reset(self) -> None:
        """Forget every namespace (a transport lost its partitions; whoever owns them now restores them)."""
        self.policy = TriggerPolicy(self.policy.min_new_items, self.policy.cooldown_s)
        self._restored.clear()
        self._retry_at.clear()
