"""The demo's loop on the real services: Kafka, the S3 store, the Faust processor and the learner service.

:class:`StackLoop`'s agent side is a :class:`reference.live_agent.LiveAgent`, as in production: it
plays episodes with the in-process model, sends them with the recorder SDK to the trajectories topic,
follows the compacted model-versions topic and loads each new version's adapter from the object store
before its next episodes. The processor (``oel processor``)
and the learner service (``oel learner run``) run as their own processes — started here
(``start_services=True``, their logs in ``<out_dir>/logs``) or already running — and the loop only
waits for their results: the experience update that covers a round's episodes, then the model version
that consolidates it.

``oel demo --stack`` runs it; ``tests/test_loop_stack.py`` runs it with a few episodes.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from confluent_kafka import Consumer, TopicPartition

from learner.versions import ModelRegistry, VersionRecord
from oel.kb import extraction_key, latest_snapshot
from oel.model.backend import Backend
from oel.schemas import ExperienceUpdate, InvalidMessage, decode
from oel.settings import Settings
from oel.store import S3Store
from oel.versions import BASE_VERSION
from recipes.demo import DemoConfig, LearningLoop, progress_bar

log = logging.getLogger(__name__)


class ServiceDied(RuntimeError):
    """A service this loop started exited while the loop waited for it."""


class StackLoop(LearningLoop):
    """The loop of :mod:`recipes.demo` on the real services (see the module docstring).

    ``service_env``: extra OEL_* variables for the services (e.g. the topic names a test uses); the
    demo's own round settings (trigger after one new item, no cool-down, auto-promotion, the round's
    OPCD steps, the extraction variant and length, one batch per round) are added to it.
    ``timeout_s`` bounds each wait for a service."""

    def __init__(
        self,
        settings: Settings,
        config: DemoConfig,
        *,
        backend: Backend | None = None,
        start_services: bool = True,
        service_env: Mapping[str, str] | None = None,
        timeout_s: float = 900.0,
        progress: Callable[[str], None] = print,
    ):
        if config.in_context:
            raise ValueError("in-context play is not supported on the real services yet (the live agent keeps no KB); drop --in-context")
        store = S3Store(settings.s3)
        store.ensure_bucket()
        super().__init__(settings, config, store, backend, progress)
        from oel.ops.topics import admin_client, ensure_topics
        from oel.topics import topic_specs

        s = self.settings
        ensure_topics(admin_client(s.kafka), topic_specs(s))
        self.timeout_s = timeout_s
        self.registry = ModelRegistry(self.store)
        self.services: dict[str, tuple[subprocess.Popen, Path]] = {}
        self.service_env = {**os.environ, **(service_env or {}), **_round_env(config)}
        if start_services:
            self.start_services()
        from oel.envs import make_env
        from oel.rollout import AgentConfig
        from reference.live_agent import LiveAgent

        self.agent = LiveAgent(
            s,
            config.ns,
            lambda: make_env(config.env, **config.env_options),
            self.backend,
            self.store,
            agent=AgentConfig(mode=config.action_mode, batch_size=config.agent_batch, seed=config.seed),
            agent_id="demo-agent",
            adapter_cache=self.out_dir / "adapters",
        )
        self._updates = Consumer(
            {
                **s.kafka.client_config(),
                "group.id": f"oel-demo-{config.ns}-{os.getpid()}",
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
            }
        )
        parts = self._updates.list_topics(s.topics.experience, timeout=10).topics[s.topics.experience].partitions
        self._updates.assign([TopicPartition(s.topics.experience, p, 0) for p in parts])
        self._round_episodes: list[str] = []

    # --- services ---------------------------------------------------------------------------

    def start_services(self) -> None:
        """Start the processor and the learner service with this loop's settings (logs in ``<out_dir>/logs``)."""
        logs = self.out_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        commands = {
            "processor": [sys.executable, "-m", "oel.cli", "processor", "--loglevel", "info"],
            "learner": [sys.executable, "-m", "oel.cli", "learner", "run"],
        }
        for name, cmd in commands.items():
            path = logs / f"{name}.log"
            with open(path, "ab") as out:
                proc = subprocess.Popen(cmd, env=self.service_env, stdout=out, stderr=subprocess.STDOUT)
            self.services[name] = (proc, path)
            self.progress(f"  started the {name} (pid {proc.pid}, log {path})")

    def close(self) -> None:
        """Stop what this loop started, flush the recorder, stop following."""
        for name, (proc, _) in self.services.items():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    log.warning("%s did not stop within 60 s; killing it", name)
                    proc.kill()
                    proc.wait(10)
        self.services.clear()
        self.agent.close()
        self._updates.close()

    def __enter__(self) -> StackLoop:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _wait(self, what: str, condition: Callable[[], object], interval: float = 1.0):
        """Poll ``condition`` until it holds; fail early if a service died, and after ``timeout_s``."""
        deadline = time.monotonic() + self.timeout_s
        while True:
            value = condition()
            if value:
                return value
            for name, (proc, path) in self.services.items():
                if proc.poll() is not None:
                    tail = path.read_text(errors="replace")[-3000:]
                    raise ServiceDied(f"the {name} exited with {proc.returncode} while waiting for {what}; log tail:\n{tail}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {self.timeout_s:.0f} s waiting for {what}")
            time.sleep(interval)

    # --- the transport --------------------------------------------------------------------------

    def play(self, round_no: int) -> tuple[list, int, str]:
        """The live agent plays the round's episodes with the version it follows and records them."""
        from oel.envs import train_seeds

        cfg = self.config
        seeds = train_seeds(cfg.episodes, start=cfg.seed + (round_no - 1) * cfg.episodes)
        with progress_bar(len(seeds), f"round {round_no}: agents play") as bar:
            episodes = self.agent.play(
                seeds,
                episode_id=lambda ep: self.episode_id(round_no, ep.seed),
                on_episode=lambda ep: (self._round_episodes.append(self.episode_id(round_no, ep.seed)), bar.update(1)),
            )
        self.serving = None if self.agent.serving == BASE_VERSION else self.agent.serving
        return episodes, sum(len(ep.turns) + 2 for ep in episodes), self.agent.serving

    def process(self) -> tuple[ExperienceUpdate | None, int]:
        """Wait until the processor's updates cover every episode of the round (or, while the KB is still
        empty, until every episode was extracted from, which publishes no update)."""
        if self.agent.recorder.flush(60):
            raise RuntimeError("the recorder could not deliver the round's events within 60 s")
        want = set(self._round_episodes)
        self._round_episodes = []
        covered: set[str] = set()
        mine: list[ExperienceUpdate] = []

        def done() -> bool:
            for upd in self._poll_updates():
                if want & set(upd.source_episode_ids):
                    mine.append(upd)
                    covered.update(upd.source_episode_ids)
            if want <= covered:
                return True
            if latest_snapshot(self.store, self.config.ns) is None and all(
                self.store.exists(extraction_key(self.config.ns, e)) for e in want
            ):
                # The KB is empty and every episode was extracted from: an update comes only if some
                # item passes validation (the processor's own functions say whether one does).
                return not self._would_add_items(want)
            return False

        self._wait(f"the processor to extract from {len(want)} episodes", done)
        if not mine:
            self.progress("  processor: no items yet (the KB is empty; no update published)")
            return None, 0
        newest = mine[-1]
        merged = newest.model_copy(
            update={"new_item_ids": [i for u in mine for i in u.new_item_ids], "source_episode_ids": sorted(covered & want)}
        )
        self.progress(f"  processor: {len(merged.new_item_ids)} new items; KB {merged.kb_version} has {merged.total_items} items")
        return merged, 0

    def _would_add_items(self, episode_ids: set[str]) -> bool:
        """Whether the stored extraction answers of these episodes hold an item the processor keeps."""
        from oel.episodes import CompletedEpisode, episode_key
        from oel.extraction import PromptVariant
        from oel.grounded import answer_items
        from oel.knowledge import WriterConfig

        ns = self.config.ns
        for eid in episode_ids:
            answer = self.store.get_json(extraction_key(ns, eid))
            if answer["variant"] == PromptVariant.grounded.value:
                kept = answer["items"]  # the grounded variant records the items each episode contributed
            else:
                episode = CompletedEpisode.model_validate(self.store.get_json(episode_key(ns, eid)))
                kept, _ = answer_items(
                    answer["output"], PromptVariant(answer["variant"]), episode, WriterConfig.from_settings(self.settings).trusted(ns)
                )
            if kept:
                return True
        return False

    def learn(self, update: ExperienceUpdate | None) -> list[VersionRecord]:
        """Wait for the learner's version of the round's KB version (decided: promoted or rejected)."""
        if update is None or not update.new_item_ids:
            return []
        self.progress(f"  learner: waiting for the round on KB {update.kb_version} (OPCD, then the gate)")

        def decided() -> VersionRecord | None:
            for record in self.registry.list(self.config.ns):
                if record.manifest.kb_version == update.kb_version and record.history:
                    return record
            return None

        record = self._wait(f"the learner's version of KB {update.kb_version}", decided, interval=2.0)
        return [record]

    def follow(self) -> None:
        """Wait until the agent's follower has seen what the registry says is current (it switches to it
        when the next batch starts)."""
        latest = self.registry.current(self.config.ns)
        if latest is not None:
            want = latest.manifest.version
            self.agent.follower.wait_for(lambda v: v is not None and v.version == want, timeout_s=60)
            self.progress(f"  agents: {want} announced; the next episodes play with it")

    def _poll_updates(self) -> list[ExperienceUpdate]:
        out = []
        while (msg := self._updates.poll(0.2)) is not None:
            if msg.error() is not None:
                continue
            try:
                upd = decode(msg.value(), ExperienceUpdate)
            except InvalidMessage:
                continue
            if upd.namespace == self.config.ns:
                out.append(upd)
        return out


def _round_env(config: DemoConfig) -> dict[str, str]:
    """The services' settings for the demo's round size (as OEL_* variables)."""
    return {
        "OEL_LEARNER__MIN_NEW_ITEMS": "1",
        "OEL_LEARNER__COOLDOWN_S": "0",
        "OEL_LEARNER__AUTO_PROMOTE": "true",
        "OEL_LEARNER__STEPS": str(config.steps),
        "OEL_LEARNER__EVAL_ENV": config.env,
        "OEL_LEARNER__EVAL_EPISODES": str(config.eval_episodes),
        **({"OEL_LEARNER__EVAL_RULES": ",".join(config.rules)} if config.env == "house-rules" else {}),
        "OEL_PROCESSOR__EXTRACTION_VARIANT": config.variant,
        "OEL_PROCESSOR__MAX_NEW_TOKENS": str(config.extraction_tokens),
        "OEL_PROCESSOR__BATCH_SIZE": str(config.episodes),
        "OEL_PROCESSOR__BATCH_WINDOW_S": "5",
    }


__all__ = ["BASE_VERSION", "ServiceDied", "StackLoop"]
