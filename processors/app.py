"""The OEL processor: a faust-streaming app from trajectory events to knowledge-base updates.

Stages (each a Faust agent; several workers share the partitions):

1. ``assemble`` reads ``oel.trajectories`` (key = episode id) in batches (``take_events``: up to
   ``take_max`` events, waiting at most ``take_within_s``). Events that are not JSON, fail the schema,
   are too large or carry a key other than their episode id go to ``oel.trajectories.dlq`` with the
   reason in the ``oel.error`` header. Valid events are added to their episode's buffer, kept in
   memory; at the end of a batch every episode still open is written once to the ``episodes`` table
   (one changelog record per episode and batch, not per event), before the batch's records are acked.
   A complete episode is re-keyed by namespace onto ``oel.episodes`` and leaves a tombstone in the
   table, so a late duplicate cannot reopen it.
2. A timer finds idle episodes and sends an ``abandon`` command to the internal control topic, on the
   episode's own partition; ``control`` closes the episode there (Faust tables can only be changed from
   a stream, never from a timer).
3. ``extract`` reads ``oel.episodes`` (key = namespace, so one writer per namespace) and collects a
   batch per namespace in memory, leaving its records un-acked; a batch is extracted when it is full,
   or when a ``flush`` record — sent by a timer once the batch has waited ``batch_window_s`` — reaches
   it. The batch goes, in a task of its own, through :class:`oel.knowledge.KnowledgeWriter` (which
   stores the episodes as training data, extracts with the model in a worker thread and appends to the
   KB), an ``ExperienceUpdate`` is published on ``oel.experience``, the namespace's KB state is written
   to the ``kb`` table, and only then are the batch's records acked. Batches of different namespaces
   run side by side (up to ``batches_in_flight``), a namespace's own one at a time, in order. After a
   crash the un-acked episodes are read again; as flushes are records in the topic, the replay forms
   exactly the same batches, and episodes already applied are skipped.

Tables use the in-memory store and are rebuilt from their changelog topics on start; the in-memory
working state (open buffers, KB states, pending batches) is dropped when partitions are revoked, and a
batch still running then neither writes its KB state nor acks its records.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import faust
from faust.streams import _current_event  # the context variable behind faust.current_event()

from oel import metrics
from oel.episodes import Action, ClosedEpisode, CompletedEpisode, EpisodeBuffer, EpisodeStatus, assemble, close
from oel.kb import KBState
from oel.knowledge import KnowledgeWriter
from oel.model.backend import BackendError
from oel.settings import KafkaSettings, Settings
from oel.store import StoreUnavailable
from oel.topics import TopicSpec, dead_letter, dlq_name, episode_record_bytes, producer_max_bytes
from processors.acks import InOrderAcks
from processors.records import (
    BatchFlush,
    ClosedEntry,
    ControlCommand,
    EpisodeEntry,
    KbEntry,
    OpenEntry,
    parse_episodes_record,
)
from processors.redelivery import DeliveryGuard

log = logging.getLogger(__name__)

TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (StoreUnavailable, BackendError, OSError)
"""Failures that retrying can fix (a service down or unreachable); any other failure of a batch is not."""

REDELIVERY_CHECK_S = 2.0
"""Period of the check for records read but never delivered (two checks in a row confirm one)."""


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
    """Builds the Faust app around a :class:`KnowledgeWriter`; ``app`` is what a worker runs.

    ``take_max``/``take_within_s``: the assembly agent handles events in batches of up to ``take_max``,
    waiting at most ``take_within_s`` for a batch to fill (a bound on the latency it adds).
    """

    def __init__(
        self,
        settings: Settings,
        writer: KnowledgeWriter,
        *,
        tick_s: float | None = None,
        take_max: int = 1000,
        take_within_s: float = 0.05,
        batches_in_flight: int = 4,
        guard_offsets: bool = True,
    ):
        self.settings = settings
        self.writer = writer
        p = settings.processor
        t = settings.topics
        self.tick_s = tick_s or max(0.5, p.abandon_after_s / 4)
        """Period of the scan of the ``episodes`` table for idle and long-closed episodes."""
        self.flush_tick_s = max(0.05, p.batch_window_s / 10)
        """Period of the check for batches that have waited ``batch_window_s`` (cheap: in memory); the
        consumer lag is observed with it, at most once a second."""
        self.take_max = take_max
        self.take_within_s = take_within_s
        self.batches_in_flight = batches_in_flight
        """Batches of different namespaces extracted side by side, at most (one at a time per namespace)."""
        self.guard_offsets = guard_offsets
        """Watch the offsets of the records the agents receive (:mod:`processors.redelivery`); off only where
        records do not come from a Kafka consumer (Faust's agent test context numbers them across partitions)."""
        self.executor = ThreadPoolExecutor(max_workers=batches_in_flight, thread_name_prefix="oel-extract")
        # In-memory working state; the tables (and un-acked input) are the truth, so all of it is
        # dropped when partitions are revoked and rebuilt from them.
        self.open: dict[str, EpisodeBuffer] = {}
        """Open episodes' buffers, ahead of the ``episodes`` table only inside an assembly batch."""
        self.episodes_lock = asyncio.Lock()
        """Held by an assembly batch and by a control command: both change open episodes."""
        self.kb_states: dict[str, KBState] = {}
        """Per namespace, the KB state last written to the ``kb`` table."""
        self.pending: dict[str, PendingBatch] = {}
        """Per namespace, the episodes waiting for extraction (their records are not acked yet)."""
        self.running: dict[str, asyncio.Task] = {}
        """Per namespace, the task extracting its last batch taken from ``pending`` (until it is in the KB)."""
        self.generation = 0
        """Partition revocations so far: a batch that ends after one leaves its records to the replay."""
        self.namespaces: set[str] = set()
        """Namespaces whose metric series this worker has created."""
        self._lag_observed_at = 0.0
        # /livez (liveness_problem): the timers run, the consumer has not crashed, and waiting input is consumed
        self.loop_beat = metrics.Heartbeat("the processor's event loop (timers)", max_age_s=max(60.0, 20 * self.flush_tick_s))
        self.stall_s = max(900.0, 2 * p.abandon_after_s)
        self._progress_at = time.monotonic()
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
            # failover: a dead worker's partitions move after session_timeout_s (Faust's default is 60 s);
            # with an instance id, a restarted worker takes its own back without waiting at all
            broker_session_timeout=p.session_timeout_s,
            broker_heartbeat_interval=min(3.0, p.session_timeout_s / 3),
            consumer_group_instance_id=p.instance_id,
            broker_commit_interval=1.0,
            # Episodes waiting for extraction stay un-acked until their batch is in the KB, so a
            # rebalance must not wait for every record to be acked (it would wait for the batch window,
            # with the flush record it needs paused behind it). Un-acked records are replayed by the
            # partition's next owner, which rebuilds the same batches.
            stream_wait_empty=False,
            consumer_auto_offset_reset="earliest",
            producer_acks=-1,
            producer_linger=0.01,
            producer_max_batch_size=1_048_576,
            # one size policy (oel.topics): anything the processor forwards, tables or dead-letters fits
            producer_max_request_size=producer_max_bytes(t),
        )
        self.app = app
        self.trajectories = app.topic(t.trajectories, key_serializer="raw", value_serializer="raw")
        self.dlq = app.topic(dlq_name(t.trajectories), key_serializer="raw", value_serializer="raw")
        self.episodes_dlq = app.topic(dlq_name(t.episodes), key_serializer="raw", value_serializer="raw")
        self.control = app.topic(
            control_topic(p.app_id), key_serializer="raw", value_serializer="json", partitions=t.trajectories_partitions, internal=True
        )
        self.episodes_topic = app.topic(t.episodes, key_serializer="raw", value_serializer="raw")
        self.experience = app.topic(t.experience, key_serializer="raw", value_serializer="raw")
        self.episodes = app.Table("episodes", default=None, partitions=t.trajectories_partitions)
        self.kb = app.Table("kb", default=None, partitions=t.episodes_partitions)
        self.assemble = app.agent(self.trajectories, name="assemble")(self._assemble)
        self.control_agent = app.agent(self.control, name="control")(self._control)
        self.extract = app.agent(self.episodes_topic, name="extract")(self._extract)
        app.timer(self.tick_s)(self._tick)
        app.timer(self.flush_tick_s)(self._flush_tick)
        self.guards = (DeliveryGuard(t.trajectories), DeliveryGuard(t.episodes))
        self.episode_acks = InOrderAcks()
        """The extraction stage's acks, released to Faust in offset order per partition (:mod:`processors.acks`)."""
        app.timer(REDELIVERY_CHECK_S)(self._redeliver)
        app.on_partitions_revoked.connect(self._on_revoked)
        topic = t.trajectories
        self._consumed = metrics.EVENTS_CONSUMED.labels(topic=topic)
        self._last_event = metrics.LAST_EVENT_TIMESTAMP.labels(topic=topic)
        for reason in metrics.DLQ_REASONS:
            metrics.count_dead_letter(topic, reason, 0)

    async def _on_revoked(self, sender: Any = None, revoked: Any = None, **kwargs: Any) -> None:
        """Partitions moved: forget the in-memory state; the tables and the replay rebuild it."""
        self.generation += 1
        self.open.clear()
        self.kb_states.clear()
        self.pending.clear()
        for guard in self.guards:
            guard.reset()
        self.episode_acks.reset()

    # --- stage 1: assembly -------------------------------------------------------------------

    async def _dead_letter(self, event: faust.EventT, reason: str, label: str | None = None) -> None:
        """Send a record unchanged to its topic's DLQ (``oel.trajectories.dlq`` or ``oel.episodes.dlq``) with
        the reason; ``label``: the metric's reason label (by default derived from ``reason``)."""
        msg = event.message
        dlq = self.episodes_dlq if msg.topic == self.settings.topics.episodes else self.dlq
        _, headers = dead_letter(msg.topic, msg.partition, msg.offset, reason, label)
        await dlq.send(key=msg.key, value=msg.value, headers=headers)

    async def _assemble(self, stream: faust.StreamT) -> None:
        guard = self.guards[0]
        manual = stream.noack()
        # take_events acks every event of a batch itself once this loop's body is done with it (after the
        # table writes): acking them here as well only ran Faust's ack path twice per event
        async for events in manual.take_events(self.take_max, within=self.take_within_s):
            guard.busy += 1
            try:
                admitted = self._admitted(guard, events)
                async with self.episodes_lock:
                    await self._assemble_batch(admitted)
                await self._seek(guard.take_seeks())
            finally:
                guard.busy -= 1

    async def _assemble_batch(self, events: list[faust.EventT]) -> None:
        """Add a batch of events to their episodes; an open episode's table entry is written once per
        batch (one changelog record however many of its events the batch held), a closed one's tombstone
        once per episode."""
        self._progress_at = time.monotonic()  # liveness: waiting input is being consumed
        self._consumed.inc(len(events))
        self._last_event.set(time.time())
        t = self.settings.topics
        touched: dict[str, tuple[faust.EventT, EpisodeBuffer]] = {}  # open episode -> its last event here, its buffer
        now = time.time()
        for event in events:
            msg = event.message
            step = assemble(msg.key, msg.value, self._lookup, now, max_event_bytes=t.max_event_bytes, max_episode_bytes=t.max_episode_bytes)
            if step.action is Action.dead_letter:
                await self._dead_letter(event, step.reason)
            elif step.action is Action.keep_open:
                self.open[step.event.episode_id] = step.buffer
                touched[step.event.episode_id] = (event, step.buffer)
            elif step.action in (Action.close, Action.close_truncated):
                if step.action is Action.close_truncated:
                    await self._dead_letter(event, step.reason)
                self.open.pop(step.event.episode_id, None)
                touched.pop(step.event.episode_id, None)
                as_current(event)
                await self._finish(step.buffer, abandoned=step.action is Action.close_truncated, reason=step.close_reason)
            else:  # ignore
                log.debug(
                    "event %s of episode %s ignored (a duplicate, or its episode is closed)", step.event.event_id, step.event.episode_id
                )
        for episode_id, (event, buffer) in touched.items():
            as_current(event)
            self.episodes[episode_id] = OpenEntry(partition=event.message.partition, buffer=buffer.model_dump(mode="json"))

    def _lookup(self, episode_id: str) -> EpisodeBuffer | ClosedEpisode | None:
        """An episode's open buffer (in memory, else from the table), its tombstone, or None."""
        buffer = self.open.get(episode_id)
        if buffer is not None:
            return buffer
        entry: EpisodeEntry | None = self.episodes.get(episode_id)
        if entry is None:
            return None
        if "closed_at" in entry:
            return ClosedEpisode(truncated=bool(entry.get("truncated")))
        return EpisodeBuffer.model_validate(entry["buffer"])

    async def _finish(self, buffer: EpisodeBuffer, *, abandoned: bool, reason: str | None = None) -> None:
        """Close an episode: hand it to extraction (which stores it), leave a tombstone (inside a stream).
        ``reason``: why an episode is closed before its end other than idleness (its size)."""
        p = self.settings.processor
        idle_s = p.abandon_after_s if abandoned and reason is None else None
        episode = close(buffer, abandoned=abandoned, idle_s=idle_s, reason=reason)
        self._meet(episode.namespace)
        # straight to the app's producer (Topic.send adds a future, sensors and callbacks per record); the
        # consumer flushes that producer before it commits the offsets of the batch
        await self.app.producer.send(
            self.settings.topics.episodes, episode.namespace.encode(), episode.model_dump_json().encode(), None, None, None
        )
        partition = event_partition()
        tombstone = ClosedEntry(partition=partition, closed_at=time.time())
        if reason is not None:
            tombstone["truncated"] = True
        self.episodes[buffer.episode_id] = tombstone
        counter = metrics.EPISODES_ABANDONED if episode.status is EpisodeStatus.abandoned else metrics.EPISODES_COMPLETED
        counter.labels(namespace=episode.namespace).inc()
        log.debug("episode %s/%s %s with %d steps", episode.namespace, episode.episode_id, episode.status.value, len(episode.steps))

    async def _control(self, stream: faust.StreamT) -> None:
        p = self.settings.processor
        async for value in stream:
            command = ControlCommand.model_validate(value)
            async with self.episodes_lock:
                episode_id = command.episode_id
                entry: EpisodeEntry | None = self.episodes.get(episode_id)
                if entry is None:
                    continue
                if command.op == "abandon" and "buffer" in entry:
                    buffer = self.open.get(episode_id) or EpisodeBuffer.model_validate(entry["buffer"])
                    if time.time() - buffer.received_at >= p.abandon_after_s:  # still idle when the command arrives
                        self.open.pop(episode_id, None)
                        await self._finish(buffer, abandoned=True)
                elif command.op == "purge" and "closed_at" in entry:
                    del self.episodes[episode_id]

    # --- stage 2: extraction -----------------------------------------------------------------

    async def _extract(self, stream: faust.StreamT) -> None:
        """Collect each namespace's episodes into a batch; its records are acked once it is in the KB."""
        guard = self.guards[1]
        manual = stream.noack()
        async for event in manual.events():
            guard.busy += 1
            try:
                for ready in self._admitted(guard, [event]):
                    self.episode_acks.delivered(ready.message.tp, ready.message.offset)
                    await self._release(manual, await self._extract_one(ready, manual))
                await self._seek(guard.take_seeks())
            finally:
                guard.busy -= 1

    async def _release(self, manual: faust.StreamT, done: list[faust.EventT]) -> None:
        """Ack records the extraction stage is done with, in offset order per partition (:mod:`processors.acks`)."""
        for event in done:
            for release in self.episode_acks.ack(event.message.tp, event.message.offset, event):
                await manual.ack(release)

    def _admitted(self, guard: DeliveryGuard, events: list[faust.EventT]) -> list[faust.EventT]:
        """The records the agent may handle, in log order; those after a hole wait, un-acked, for the seek."""
        if not self.guard_offsets:
            return events
        committed = self.app.consumer._committed_offset  # faust keeps no public accessor for this
        return [e for e in events if guard.admit(e.message.tp, e.message.offset, committed.get(e.message.tp))]

    async def _seek(self, seeks: dict[Any, int]) -> None:
        for tp, offset in seeks.items():
            log.warning("%s/%d: records from offset %d were read but never delivered; reading them again", tp.topic, tp.partition, offset)
            metrics.REDELIVERIES.labels(topic=tp.topic).inc()
            await self.app.consumer.seek(tp, offset)

    def _kb_state(self, namespace: str) -> KBState:
        state = self.kb_states.get(namespace)
        if state is None:
            entry: KbEntry | None = self.kb.get(namespace)
            state = KBState.model_validate(entry["state"]) if entry else KBState(namespace=namespace)
            self.kb_states[namespace] = state
            self._meet(namespace)
            metrics.KB_ITEMS.labels(namespace=namespace).set(len(state.all_ids))
            metrics.KB_SIZE.labels(namespace=namespace).set(sum(len(t.encode()) for t in state.window_texts))
        return state

    def _meet(self, namespace: str) -> None:
        """A namespace's counters start at 0 when this worker first meets it (so increase() sees the first event)."""
        if namespace not in self.namespaces:
            self.namespaces.add(namespace)
            metrics.init_namespace(namespace)

    async def _extract_one(self, event: faust.EventT, manual: faust.StreamT) -> list[faust.EventT]:
        """Handle one record of ``oel.episodes``; returns the records that may now be acked (a batch's own
        records are acked by its task, once it is in the KB: :meth:`_start_batch`)."""
        namespace = event.message.key.decode()
        value = event.message.value
        batch = self.pending.get(namespace)
        episode = parse_episodes_record(value)
        if isinstance(episode, BatchFlush):
            if batch is not None and batch.episodes[0].episode_id == episode.flush:
                # acked now, but released only after the batch's records, which come before it on its partition
                await self._start_batch(namespace, manual)
            return [event]
        state = self._kb_state(namespace)
        if episode.episode_id in state.applied_episodes:
            return [event]  # a replayed or duplicated episode
        if batch is not None and episode.episode_id in batch.ids:
            batch.events.append(event)  # delivered twice: acked with its batch, never before it is in the KB
            return []
        if batch is None:
            batch = self.pending[namespace] = PendingBatch(since=time.time())
        batch.add(episode, event)
        if len(batch.episodes) >= self.settings.processor.batch_size:
            await self._start_batch(namespace, manual)
        return []

    async def _start_batch(self, namespace: str, manual: faust.StreamT) -> None:
        """Take the namespace's pending batch and extract it in a task of its own, so that batches of other
        namespaces, and the store requests they wait for, run side by side (at most ``batches_in_flight``).

        A namespace's batches still run one at a time and in order (each builds on the KB state the one
        before it wrote): a batch waits here for its namespace's previous one, and for a free slot, which
        holds the agent back as a running batch always did. Which episodes form a batch depends only on
        the records' order, so a replay still forms the same batches.
        """
        previous = self.running.get(namespace)
        if previous is not None:
            await asyncio.wait([previous])
        while len(self.running) >= self.batches_in_flight:
            await asyncio.wait(list(self.running.values()), return_when=asyncio.FIRST_COMPLETED)
        batch = self.pending.pop(namespace, None)
        if batch is None:  # partitions were revoked meanwhile: the replay rebuilds it
            return
        task = self._batch_task(namespace, batch, manual, self.generation)
        self.running[namespace] = asyncio.create_task(task, name=f"oel-batch-{namespace}")

    async def _batch_task(self, namespace: str, batch: PendingBatch, manual: faust.StreamT, generation: int) -> None:
        """One batch into the KB, then its KB state into the ``kb`` table and its records acked, unless
        partitions were revoked meanwhile (their next owner replays the records; every write is idempotent).
        A failure that is not the batch's own (those :meth:`_run_batch` handles) stops the worker, as it would
        have stopped the agent, so the records are replayed."""
        try:
            state = await self._run_batch(namespace, batch)
            if generation == self.generation:
                self._save_kb_state(namespace, state, batch.events[-1])
                await self._release(manual, batch.events)
        except Exception as exc:
            log.exception("extraction of a batch of %s failed outside its own error handling; stopping", namespace)
            await self.app.crash(exc)
        finally:
            if self.running.get(namespace) is asyncio.current_task():
                del self.running[namespace]

    def _save_kb_state(self, namespace: str, state: KBState, event: faust.EventT) -> None:
        """Write a namespace's KB state to the ``kb`` table (on ``event``'s partition, the namespace's)."""
        as_current(event)
        self.kb[namespace] = KbEntry(state=state.model_dump(mode="json"))
        self.kb_states[namespace] = state

    async def _run_batch(self, namespace: str, batch: PendingBatch) -> KBState:
        """Extract from a batch's episodes and append to the KB; returns the namespace's new KB state.

        A transient fault (store, model server or network down) is retried with back-off until it clears:
        a batch is never dropped for one. Any other failure is one that retrying cannot fix: the episodes
        are then extracted one at a time, and an episode that still fails goes to ``oel.episodes.dlq``
        with the reason, so one bad episode never stops the others, nor other namespaces.
        """
        state = self._kb_state(namespace)
        t0 = time.monotonic()
        try:
            state = await self._apply(namespace, state, batch.episodes)
        except Exception as exc:  # not transient (_apply retries those)
            log.warning("extraction of %d episodes of %s failed (%s); extracting them one at a time", len(batch.episodes), namespace, exc)
            for episode, event in zip(batch.episodes, batch.events, strict=True):
                try:
                    state = await self._apply(namespace, state, [episode])
                except Exception as one:
                    await self._dead_letter(event, f"extraction failed: {type(one).__name__}: {one}"[:2000], label="extraction")
        metrics.EXTRACTION_DURATION.labels(namespace=namespace).observe(time.monotonic() - t0)
        return state

    async def _apply(self, namespace: str, state: KBState, episodes: list[CompletedEpisode]) -> KBState:
        """One :meth:`KnowledgeWriter.process_batch`, retried while it fails transiently; publishes the
        update and returns the new state. A non-transient failure is raised."""
        loop = asyncio.get_running_loop()
        delay = 1.0
        while True:
            try:
                new_state, result = await loop.run_in_executor(self.executor, self.writer.process_batch, state, episodes)
                break
            except TRANSIENT_ERRORS:
                metrics.EXTRACTION_FAILURES.labels(namespace=namespace).inc()
                log.exception("extraction of %d episodes of %s failed; retrying in %.0fs", len(episodes), namespace, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 60)
            except Exception:
                metrics.EXTRACTION_FAILURES.labels(namespace=namespace).inc()
                raise
        metrics.KB_ITEMS_APPENDED.labels(namespace=namespace).inc(len(result.new_items))
        metrics.KB_ITEMS_DEDUPLICATED.labels(namespace=namespace).inc(result.deduplicated)
        metrics.KB_ITEMS.labels(namespace=namespace).set(len(new_state.all_ids))
        metrics.KB_SIZE.labels(namespace=namespace).set(sum(len(t.encode()) for t in new_state.window_texts))
        if result.snapshot_tokens is not None:
            metrics.KB_SNAPSHOT_TOKENS.labels(namespace=namespace).set(result.snapshot_tokens)
        if result.update is not None:
            await self.experience.send(key=namespace.encode(), value=result.update.to_bytes())
            log.info(
                "%s: KB %s, %d new items (%d deduplicated, %d rejected) from %d episodes",
                namespace,
                result.update.kb_version,
                len(result.new_items),
                result.deduplicated,
                result.rejected,
                len(episodes),
            )
        return new_state

    # --- timers --------------------------------------------------------------------------------

    async def _tick(self) -> None:
        """Send abandon/purge commands; never changes a table itself."""
        p = self.settings.processor
        now = time.time()
        entries: list[tuple[str, EpisodeEntry | None]] = list(self.episodes.items())
        for episode_id, entry in entries:
            if entry is None:
                continue
            if "buffer" in entry and now - entry["buffer"]["received_at"] >= p.abandon_after_s:
                await self.control.send(
                    key=episode_id.encode(),
                    value=ControlCommand(op="abandon", episode_id=episode_id).model_dump(),
                    partition=entry["partition"],
                )
            elif "closed_at" in entry and now - entry["closed_at"] >= max(4 * p.abandon_after_s, 3600):
                await self.control.send(
                    key=episode_id.encode(),
                    value=ControlCommand(op="purge", episode_id=episode_id).model_dump(),
                    partition=entry["partition"],
                )

    async def _flush_tick(self) -> None:
        """Send a flush record for every batch that has waited ``batch_window_s``."""
        p = self.settings.processor
        now = time.time()
        self.loop_beat.beat()
        for namespace, batch in list(self.pending.items()):
            if now - batch.since >= p.batch_window_s and not batch.flush_sent:
                batch.flush_sent = True
                first = batch.episodes[0].episode_id
                await self.episodes_topic.send(key=namespace.encode(), value=BatchFlush(flush=first).to_bytes())
        if now - self._lag_observed_at >= 1.0:
            self._lag_observed_at = now
            self._observe_lag()

    async def _redeliver(self) -> None:
        """Seek partitions whose records Faust read but never delivered (:mod:`processors.redelivery`)."""
        consumer = getattr(self.app, "consumer", None)
        if not self.guard_offsets or consumer is None or self.app.rebalancing or not self.app.flow_control.is_active():
            for guard in self.guards:
                guard.reset()
            return
        assignment = list(consumer.assignment())
        for guard in self.guards:
            tps = [tp for tp in assignment if tp.topic == guard.topic]
            await self._seek(
                guard.stalled({tp: consumer.highwater(tp) for tp in tps}, {tp: consumer._committed_offset.get(tp) for tp in tps})
            )

    def _observe_lag(self) -> None:
        consumer = getattr(self.app, "consumer", None)
        if consumer is None:
            return
        waiting = False
        for tp in list(consumer.assignment()):
            committed = consumer._committed_offset.get(tp)  # faust keeps no public accessor for this
            high = consumer.highwater(tp)
            if committed is not None and high is not None:
                metrics.CONSUMER_LAG.labels(topic=tp.topic, partition=str(tp.partition)).set(max(0, high - committed))
                waiting = waiting or (tp.topic == self.settings.topics.trajectories and high > committed)
        if not waiting:
            self._progress_at = time.monotonic()  # nothing to consume is no stall

    def liveness_problem(self) -> str | None:
        """For ``/livez``: None while the worker makes progress. Not live: the timers stopped running (a blocked
        event loop), Faust's consumer crashed, or trajectory events have been waiting for ``stall_s`` with none
        consumed (a stuck stream). A broker or store that is down is readiness, not liveness."""
        problem = self.loop_beat.problem()
        if problem is not None:
            return problem
        consumer = getattr(self.app, "consumer", None)
        if consumer is not None and getattr(consumer, "crashed", False):
            return "the Kafka consumer crashed"
        idle = time.monotonic() - self._progress_at
        if idle > self.stall_s:
            return f"trajectory events are waiting but none was consumed for {idle:.0f}s (limit {self.stall_s:.0f}s)"
        return None


@dataclass
class PendingBatch:
    """The episodes of one namespace waiting for extraction, with their (un-acked) records."""

    since: float
    episodes: list[CompletedEpisode] = field(default_factory=list)
    events: list[faust.EventT] = field(default_factory=list)
    ids: set[str] = field(default_factory=set)
    flush_sent: bool = False

    def add(self, episode: CompletedEpisode, event: faust.EventT) -> None:
        self.episodes.append(episode)
        self.events.append(event)
        self.ids.add(episode.episode_id)


def make_worker(app: faust.App, loglevel: str) -> faust.Worker:
    """A Faust worker for ``app`` without the start-up spinner: at a log level of WARN and above, Faust
    shows one and sets the root logger to DEBUG for good, so that every debug call in Faust and aiokafka
    (one per record sent) builds a log record (a measurable share of the worker's time: bench/README.md)."""
    worker = faust.Worker(app, loglevel=loglevel, quiet=True)
    worker.spinner = None
    return worker


def as_current(event: faust.EventT) -> None:
    """Make ``event`` the current event of this task, so that a table change goes to its partition's
    changelog (inside a batch from ``take_events`` Faust does not set it per event).

    Only the task's context variable is set, not the stream's ``current_event`` attribute, which
    ``take_events`` reads from another task to collect the next batch.
    """
    _current_event.set(weakref.ref(event))


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
        TopicSpec(
            f"{p.app_id}-{name}-changelog",
            parts[name],
            rf,
            {"cleanup.policy": "compact", "max.message.bytes": str(episode_record_bytes(t))},
            f"changelog of the {name} table",
        )
        for name in TABLES
    ]
    specs.append(
        TopicSpec(
            control_topic(p.app_id),
            t.trajectories_partitions,
            rf,
            {"cleanup.policy": "delete", "retention.ms": str(24 * 3600 * 1000)},
            "abandon/purge commands for the episodes table",
        )
    )
    return specs


def event_partition() -> int:
    """The partition of the event being processed (the one a table change goes to)."""
    event = faust.current_event()
    assert event is not None, "table changes happen inside a stream"
    return event.message.partition
