"""The OEL processor: a faust-streaming app from trajectory events to knowledge-base updates.

Stages (each a Faust agent; several workers share the partitions):

1. ``assemble`` reads ``oel.trajectories`` (key = episode id). Events that are not JSON, fail the
   schema, are too large or carry a key other than their episode id go to ``oel.trajectories.dlq`` with
   the reason in the ``oel.error`` header. Valid events are added to their episode's buffer in the
   ``episodes`` table; a complete episode is stored as training data and re-keyed by namespace onto
   ``oel.episodes``. A closed episode leaves a tombstone so a late duplicate cannot reopen it.
2. A timer finds idle episodes and sends an ``abandon`` command to the internal control topic, on the
   episode's own partition; ``control`` closes the episode there (Faust tables can only be changed from
   a stream, never from a timer).
3. ``extract`` reads ``oel.episodes`` (key = namespace, so one writer per namespace) and collects a
   batch per namespace; a batch is extracted when it is full, or when a ``flush`` record — sent by a
   timer once the batch has waited ``batch_window_s`` — reaches it. Because flushes are records in the
   topic, a replay after a crash forms exactly the same batches. The batch goes through
   :class:`oel.knowledge.KnowledgeWriter` (model in a worker thread) and an ``ExperienceUpdate`` is
   published on ``oel.experience``.

Tables use the in-memory store and are rebuilt from their changelog topics on start.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import faust

from oel import metrics
from oel.episodes import AddResult, CompletedEpisode, EpisodeBuffer, EpisodeStatus, add_event, close
from oel.kb import KBState
from oel.knowledge import KnowledgeWriter
from oel.schemas import InvalidMessage, TrajectoryEvent, decode
from oel.settings import KafkaSettings, Settings
from oel.topics import TopicSpec, dlq_name

log = logging.getLogger(__name__)

ERROR_HEADER = "oel.error"
SOURCE_HEADER = "oel.source"


def dlq_reason_label(reason: str) -> str:
    """The bounded metric label of a DLQ reason."""
    if reason.startswith("not valid JSON") or reason.startswith("empty"):
        return "not_json"
    if "over the limit" in reason:
        return "too_large"
    return "schema"


def broker_settings(kafka: KafkaSettings) -> dict[str, Any]:
    """Faust broker URLs and credentials from the shared Kafka settings."""
    conf: dict[str, Any] = {"broker": [f"kafka://{hp}" for hp in kafka.bootstrap_servers.split(",")]}
    if kafka.security_protocol.startswith("SASL"):
        conf["broker_credentials"] = faust.SASLCredentials(
            username=kafka.sasl_username,
            password=kafka.sasl_password.get_secret_value() if kafka.sasl_password else None,
            ssl_context=_ssl_context(kafka) if kafka.security_protocol == "SASL_SSL" else None,
            mechanism=kafka.sasl_mechanism,
        )
    elif kafka.security_protocol == "SSL":
        conf["broker_credentials"] = faust.SSLCredentials(_ssl_context(kafka))
    return conf


def _ssl_context(kafka: KafkaSettings):
    import ssl

    return ssl.create_default_context(cafile=str(kafka.ssl_ca_location) if kafka.ssl_ca_location else None)


class Processor:
    """Builds the Faust app around a :class:`KnowledgeWriter`; ``app`` is what a worker runs."""

    def __init__(self, settings: Settings, writer: KnowledgeWriter, *, tick_s: float | None = None):
        self.settings = settings
        self.writer = writer
        p = settings.processor
        t = settings.topics
        self.tick_s = tick_s or max(0.5, min(p.abandon_after_s, p.batch_window_s) / 4)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="oel-extract")
        self.locks: dict[str, asyncio.Lock] = {}
        self.namespaces_seen: set[str] = set()  # metrics.init_namespace done
        datadir = settings.paths.state_dir / "processor" / p.app_id
        datadir.mkdir(parents=True, exist_ok=True)
        app = faust.App(
            p.app_id,
            **broker_settings(settings.kafka),
            store="memory://",
            datadir=str(datadir),
            topic_partitions=t.trajectories_partitions,
            table_standby_replicas=0,
            web_enabled=False,
            topic_disable_leader=True,
            # Faust creates topics with CreateTopics v1, which Kafka 4 no longer accepts (it drops the
            # connection): every topic the app uses is created beforehand by internal_topic_specs().
            topic_allow_declare=False,
            broker_max_poll_interval=3600.0,
            broker_commit_interval=1.0,
            stream_wait_empty=True,
            consumer_auto_offset_reset="earliest",
            producer_acks=-1,
            # Table changelogs get a record per event: let aiokafka batch them instead of sending each alone.
            producer_linger=0.01,
            producer_max_batch_size=1_048_576,
        )
        self.app = app
        self.trajectories = app.topic(t.trajectories, key_serializer="raw", value_serializer="raw")
        self.dlq = app.topic(dlq_name(t.trajectories), key_serializer="raw", value_serializer="raw")
        self.control = app.topic(
            control_topic(p.app_id), key_serializer="raw", value_serializer="json", partitions=t.trajectories_partitions, internal=True
        )
        self.episodes_topic = app.topic(t.episodes, key_serializer="raw", value_serializer="raw")
        self.experience = app.topic(t.experience, key_serializer="raw", value_serializer="raw")
        self.episodes = app.Table("episodes", default=None, partitions=t.trajectories_partitions)
        self.kb = app.Table("kb", default=None, partitions=t.episodes_partitions)
        app.agent(self.trajectories, name="assemble")(self._assemble)
        app.agent(self.control, name="control")(self._control)
        app.agent(self.episodes_topic, name="extract")(self._extract)
        app.timer(self.tick_s)(self._tick)

    # --- stage 1: assembly -------------------------------------------------------------------

    async def _dead_letter(self, event: faust.EventT, reason: str) -> None:
        msg = event.message
        headers = [(ERROR_HEADER, reason.encode()), (SOURCE_HEADER, f"{msg.topic}/{msg.partition}/{msg.offset}".encode())]
        await self.dlq.send(key=msg.key, value=msg.value, headers=headers)
        metrics.count_dead_letter(self.settings.topics.trajectories, dlq_reason_label(reason))
        log.warning("dead-lettered %s/%d@%d: %s", msg.topic, msg.partition, msg.offset, reason)

    async def _assemble(self, stream: faust.StreamT) -> None:
        topic = self.settings.topics.trajectories
        async for event in stream.events():
            metrics.EVENTS_CONSUMED.labels(topic=topic).inc()
            metrics.LAST_EVENT_TIMESTAMP.labels(topic=topic).set(time.time())
            try:
                ev = decode(event.message.value, TrajectoryEvent, max_bytes=self.settings.topics.max_event_bytes)
            except InvalidMessage as exc:
                await self._dead_letter(event, exc.reason)
                continue
            key = event.message.key.decode(errors="replace") if event.message.key is not None else None
            if key != ev.episode_id:
                await self._dead_letter(event, f"record key {key!r} is not the episode id {ev.episode_id!r}")
                continue
            entry = self.episodes.get(ev.episode_id)
            if entry is not None and "closed_at" in entry:
                log.debug("event %s for closed episode %s ignored", ev.event_id, ev.episode_id)
                continue
            buffer = EpisodeBuffer.model_validate(entry["buffer"]) if entry else None
            buffer, result = add_event(buffer, ev, time.time())
            if result is AddResult.conflict:
                await self._dead_letter(event, f"namespace {ev.namespace!r} differs from the episode's {buffer.namespace!r}")
            elif result is AddResult.complete:
                await self._finish(buffer, abandoned=False)
            elif result is AddResult.accepted:
                self.episodes[ev.episode_id] = {"partition": event.message.partition, "buffer": buffer.model_dump(mode="json")}

    async def _finish(self, buffer: EpisodeBuffer, *, abandoned: bool) -> None:
        """Close an episode: hand it to extraction (which stores it), leave a tombstone (inside a stream)."""
        p = self.settings.processor
        episode = close(buffer, abandoned=abandoned, idle_s=p.abandon_after_s if abandoned else None)
        await self.episodes_topic.send(key=episode.namespace.encode(), value=episode.model_dump_json().encode())
        partition = event_partition()
        self.episodes[buffer.episode_id] = {"partition": partition, "closed_at": time.time()}
        if episode.namespace not in self.namespaces_seen:  # series at 0 first, so increase() sees the first count
            metrics.init_namespace(episode.namespace)
            self.namespaces_seen.add(episode.namespace)
        counter = metrics.EPISODES_ABANDONED if episode.status is EpisodeStatus.abandoned else metrics.EPISODES_COMPLETED
        counter.labels(namespace=episode.namespace).inc()
        log.info("episode %s/%s %s with %d steps", episode.namespace, episode.episode_id, episode.status.value, len(episode.steps))

    async def _control(self, stream: faust.StreamT) -> None:
        p = self.settings.processor
        async for command in stream:
            entry = self.episodes.get(command["episode_id"])
            if entry is None:
                continue
            if command["op"] == "abandon" and "buffer" in entry:
                buffer = EpisodeBuffer.model_validate(entry["buffer"])
                if time.time() - buffer.received_at >= p.abandon_after_s:  # still idle when the command arrives
                    await self._finish(buffer, abandoned=True)
            elif command["op"] == "purge" and "closed_at" in entry:
                del self.episodes[command["episode_id"]]

    # --- stage 2: extraction -----------------------------------------------------------------

    async def _extract(self, stream: faust.StreamT) -> None:
        async for event in stream.events():
            record = json.loads(event.message.value)
            namespace = event.message.key.decode()
            lock = self.locks.setdefault(namespace, asyncio.Lock())
            async with lock:
                entry = self.kb.get(namespace) or {"state": KBState(namespace=namespace).model_dump(mode="json"), "pending": []}
                if "flush" in record:
                    pending = entry["pending"]
                    if pending and pending[0]["episode_id"] == record["flush"]:
                        entry = await self._run_batch(namespace, entry)
                        self.kb[namespace] = entry
                    continue
                episode = CompletedEpisode.model_validate(record)
                state = KBState.model_validate(entry["state"])
                if episode.episode_id in state.applied_episodes or any(
                    e["episode_id"] == episode.episode_id for e in entry["pending"]
                ):
                    continue  # a replayed or duplicated episode
                entry["pending"].append(json.loads(episode.model_dump_json()))
                entry["pending_since"] = entry.get("pending_since") or time.time()
                if len(entry["pending"]) >= self.settings.processor.batch_size:
                    entry = await self._run_batch(namespace, entry)
                self.kb[namespace] = entry

    async def _run_batch(self, namespace: str, entry: dict) -> dict:
        """Extract from the pending episodes; retried until it succeeds (a batch is never dropped)."""
        state = KBState.model_validate(entry["state"])
        episodes = [CompletedEpisode.model_validate(e) for e in entry["pending"]]
        loop = asyncio.get_running_loop()
        delay = 1.0
        while True:
            t0 = time.monotonic()
            try:
                new_state, result = await loop.run_in_executor(self.executor, self.writer.process_batch, state, episodes)
                break
            except Exception:
                metrics.EXTRACTION_FAILURES.labels(namespace=namespace).inc()
                log.exception("extraction of %d episodes of %s failed; retrying in %.0fs", len(episodes), namespace, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 60)
        metrics.EXTRACTION_DURATION.labels(namespace=namespace).observe(time.monotonic() - t0)
        metrics.KB_ITEMS_APPENDED.labels(namespace=namespace).inc(len(result.new_items))
        metrics.KB_ITEMS_DEDUPLICATED.labels(namespace=namespace).inc(result.deduplicated)
        metrics.KB_ITEMS.labels(namespace=namespace).set(len(new_state.all_ids))
        metrics.KB_SIZE.labels(namespace=namespace).set(sum(len(t.encode()) for t in new_state.window_texts))
        metrics.KB_SNAPSHOT_TOKENS.labels(namespace=namespace).set(sum(self.writer.count_tokens(f"- {t}\n") for t in new_state.window_texts))
        if result.update is not None:
            await self.experience.send(key=namespace.encode(), value=result.update.to_bytes())
            log.info(
                "%s: KB %s, %d new items (%d deduplicated, %d rejected) from %d episodes",
                namespace, result.update.kb_version, len(result.new_items), result.deduplicated, result.rejected, len(episodes),
            )
        return {"state": new_state.model_dump(mode="json"), "pending": [], "pending_since": None}

    # --- timers --------------------------------------------------------------------------------

    async def _tick(self) -> None:
        """Send abandon/purge and flush commands; never changes a table itself."""
        p = self.settings.processor
        now = time.time()
        for episode_id, entry in list(self.episodes.items()):
            if entry is None:
                continue
            if "buffer" in entry and now - entry["buffer"]["received_at"] >= p.abandon_after_s:
                await self.control.send(
                    key=episode_id.encode(), value={"op": "abandon", "episode_id": episode_id}, partition=entry["partition"]
                )
            elif "closed_at" in entry and now - entry["closed_at"] >= max(4 * p.abandon_after_s, 3600):
                await self.control.send(
                    key=episode_id.encode(), value={"op": "purge", "episode_id": episode_id}, partition=entry["partition"]
                )
        for namespace, entry in list(self.kb.items()):
            if entry and entry.get("pending") and now - (entry.get("pending_since") or now) >= p.batch_window_s:
                first = entry["pending"][0]["episode_id"]
                await self.episodes_topic.send(key=namespace.encode(), value=json.dumps({"flush": first}).encode())
        self._observe_lag()

    def _observe_lag(self) -> None:
        consumer = getattr(self.app, "consumer", None)
        if consumer is None:
            return
        for tp in list(consumer.assignment()):
            committed = consumer._committed_offset.get(tp)  # faust keeps no public accessor for this
            high = consumer.highwater(tp)
            if committed is not None and high is not None:
                metrics.CONSUMER_LAG.labels(topic=tp.topic, partition=str(tp.partition)).set(max(0, high - committed))


TABLES = ("episodes", "kb")


def control_topic(app_id: str) -> str:
    return f"{app_id}-control"


def internal_topic_specs(settings: Settings) -> list[TopicSpec]:
    """The processor's own topics: table changelogs (compacted) and the control topic.

    Partition counts must equal those of the stream each table is keyed by.
    """
    t, p = settings.topics, settings.processor
    rf = t.replication_factor
    parts = {"episodes": t.trajectories_partitions, "kb": t.episodes_partitions}
    specs = [
        TopicSpec(f"{p.app_id}-{name}-changelog", parts[name], rf, {"cleanup.policy": "compact"}, f"changelog of the {name} table")
        for name in TABLES
    ]
    specs.append(
        TopicSpec(
            control_topic(p.app_id), t.trajectories_partitions, rf,
            {"cleanup.policy": "delete", "retention.ms": str(24 * 3600 * 1000)}, "abandon/purge commands for the episodes table",
        )
    )
    return specs


def event_partition() -> int:
    """The partition of the event being processed (the one a table change goes to)."""
    event = faust.current_event()
    assert event is not None, "table changes happen inside a stream"
    return event.message.partition
