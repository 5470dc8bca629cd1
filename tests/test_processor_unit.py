"""Broker-less unit tests of the processor's agents (processors/app.py), through faust's test contexts.

The real agent functions of :class:`processors.app.Processor` run on faust's in-memory test channels
(``agent.test_context()``), with the real tables (in memory) and the real decoding, assembly and
dead-lettering code. No broker is reachable: the Kafka address points at a closed port, and the one
stand-in is :class:`InMemoryProducer`, which takes the place of the Kafka producer and records what
the app sends (DLQ records, completed episodes, changelog records) so the tests can read it.
"""

from __future__ import annotations

import asyncio
import functools
import json
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import pytest
from faust.transport.producer import Producer
from faust.types import TP
from faust.types.tuples import RecordMetadata

from oel import metrics
from oel.episodes import CompletedEpisode
from oel.kb import KBState
from oel.settings import load_settings
from oel.topics import ERROR_HEADER, SOURCE_HEADER, dlq_name
from processors.app import Processor
from tests.test_processor import episode_events


@dataclass
class Sent:
    key: bytes | None
    value: bytes | None
    partition: int | None
    headers: dict[str, bytes]


class InMemoryProducer(Producer):
    """Stand-in for the Kafka producer (these tests have no broker): records every record sent, by topic."""

    def __init__(self, app):
        super().__init__(app.transport)
        self.sent: dict[str, list[Sent]] = defaultdict(list)

    def _record(self, topic, key, value, partition, headers) -> RecordMetadata:
        records = self.sent[topic]
        records.append(Sent(key, value, partition, dict(headers or {})))
        part = partition or 0
        return RecordMetadata(topic=topic, partition=part, topic_partition=TP(topic, part), offset=len(records) - 1)

    async def send(self, topic, key, value, partition, timestamp, headers, *, transactional_id=None):
        fut = asyncio.get_running_loop().create_future()
        fut.set_result(self._record(topic, key, value, partition, headers))
        return fut

    async def send_and_wait(self, topic, key, value, partition, timestamp, headers, *, transactional_id=None):
        return self._record(topic, key, value, partition, headers)

    def send_soon(self, fut) -> None:
        m = fut.message
        topic = m.channel.get_topic_name()
        fut.set_result(self._record(topic, m.key, m.value, m.partition, m.headers))

    async def flush(self) -> None:
        return None

    async def maybe_start(self) -> None:
        return None

    def key_partition(self, topic, key):  # pragma: no cover - the app always names the partition
        return TP(topic, 0)


@pytest.fixture
def proc(monkeypatch, tmp_path) -> Callable[[], Processor]:
    """Makes the processor inside the test's event loop (faust binds to the running loop)."""
    monkeypatch.setenv("OEL_KAFKA__BOOTSTRAP_SERVERS", "127.0.0.1:1")  # nothing listens there
    monkeypatch.setenv("OEL_PATHS__STATE_DIR", str(tmp_path))
    monkeypatch.setenv("OEL_TOPICS__MAX_EVENT_BYTES", "4096")
    monkeypatch.setenv("OEL_PROCESSOR__APP_ID", f"unit-{tmp_path.name}")

    def make() -> Processor:
        # the extract agent is not run here; the test context's records do not come from a Kafka consumer
        processor = Processor(load_settings(), writer=None, take_within_s=0.01, guard_offsets=False)
        processor.app.producer = InMemoryProducer(processor.app)
        processor.app.finalize()
        return processor

    return make


def in_loop(test: Callable[[Processor], Awaitable[None]]):
    """Run an async test body on a fresh asyncio loop, with a processor made inside it."""

    @functools.wraps(test)
    def run(proc: Callable[[], Processor]) -> None:
        async def main() -> None:
            await asyncio.wait_for(test(proc()), timeout=60)

        asyncio.run(main())

    return run


async def until(condition: Callable[[], object], what: str, timeout: float = 10.0):
    """Await ``condition`` becoming truthy (the agent works in batches, in its own task)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not (value := condition()):
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)
    return value


def completed(proc: Processor) -> list[tuple[bytes, CompletedEpisode]]:
    sent = proc.app.producer.sent[proc.settings.topics.episodes]
    return [(s.key, CompletedEpisode.model_validate_json(s.value)) for s in sent]


def dead(proc: Processor) -> list[Sent]:
    return proc.app.producer.sent[dlq_name(proc.settings.topics.trajectories)]


async def put_all(agent, events, partition: int = 0) -> None:
    for ev in events:
        await agent.put(ev.to_bytes(), key=ev.episode_id.encode(), partition=partition)


def counter(name: str, **labels: str) -> float:
    return metrics.sample_value(name, labels) or 0.0


@in_loop
async def test_end_event_completes_the_episode_and_rekeys_it_by_namespace(proc):
    topic = proc.settings.topics.trajectories
    consumed_before = counter("oel_events_consumed_total", topic=topic)
    done_before = counter("oel_episodes_completed_total", namespace="unit-a")
    events = episode_events("ep-1", "unit-a", turns=2)
    async with proc.assemble.test_context() as agent:
        await put_all(agent, events[:-1], partition=3)
        await until(lambda: proc.episodes.get("ep-1"), "the open episode in the table")
        assert not completed(proc), "completed before its end event"
        assert proc.episodes["ep-1"]["partition"] == 3 and "buffer" in proc.episodes["ep-1"]
        await put_all(agent, events[-1:], partition=3)
        [(key, episode)] = await until(lambda: completed(proc), "the completed episode")
        await until(lambda: "closed_at" in proc.episodes["ep-1"], "the episode's tombstone")
    assert key == b"unit-a"  # re-keyed by namespace
    assert episode.episode_id == "ep-1" and episode.status.value == "completed" and not episode.missing_seqs
    assert [s.prompt for s in episode.steps] == [e.step.prompt for e in events[1:-1]]
    assert proc.episodes["ep-1"]["partition"] == 3
    assert "ep-1" not in proc.open
    assert counter("oel_events_consumed_total", topic=topic) - consumed_before == len(events)
    assert counter("oel_episodes_completed_total", namespace="unit-a") - done_before == 1
    # The table's changes went to the changelog partition of the events' partition.
    changelog = proc.app.producer.sent[proc.episodes.changelog_topic.get_topic_name()]
    assert changelog and {c.partition for c in changelog} == {3}


@in_loop
async def test_duplicates_and_out_of_order_steps_are_ordered_by_sequence_number(proc):
    events = episode_events("ep-2", "unit-b", turns=4)
    start, steps, end = events[0], events[1:-1], events[-1]
    # A resent event id carrying another sequence number, and another event id for a sequence number
    # already in: both are duplicates, neither may fill a gap or replace the first copy.
    dup_by_id = steps[2].model_copy(update={"seq": steps[3].seq})
    dup_by_seq = steps[0].model_copy(update={"event_id": "other-id", "step": steps[0].step.model_copy(update={"response": "changed"})})
    # The end arrives early; step 4 (seq 4) is still missing after these.
    arrival = [start, steps[2], end, steps[0], dup_by_id, start, dup_by_seq, steps[1]]
    async with proc.assemble.test_context() as agent:
        await put_all(agent, arrival)
        await until(lambda: "buffer" in (proc.episodes.get("ep-2") or {}), "the open episode")
        assert not completed(proc), "completed while a step was missing"
        assert sorted(proc.episodes["ep-2"]["buffer"]["events"]) == ["0", "1", "2", "3", "5"]
        await put_all(agent, [steps[3], end, steps[0]])  # the missing step, then late duplicates
        [(_, episode)] = await until(lambda: completed(proc), "the completed episode")
        await until(lambda: "closed_at" in proc.episodes["ep-2"], "the tombstone")
    assert [s.prompt for s in episode.steps] == [s.step.prompt for s in steps]
    assert [s.response for s in episode.steps] == [s.step.response for s in steps]  # first copy kept
    assert len(completed(proc)) == 1 and not dead(proc)


@in_loop
async def test_an_open_episode_survives_losing_the_in_memory_cache(proc):
    """Between batches an open episode lives in the table; after a rebalance (cache dropped) the next
    event continues it from there."""
    events = episode_events("ep-3", "unit-c", turns=3)
    async with proc.assemble.test_context() as agent:
        await put_all(agent, events[:3])
        await until(lambda: len((proc.episodes.get("ep-3") or {}).get("buffer", {}).get("events", {})) == 3, "three events in the table")
        await proc._on_revoked(revoked=set())
        assert not proc.open
        await put_all(agent, events[3:])
        [(_, episode)] = await until(lambda: completed(proc), "the completed episode")
    assert len(episode.steps) == 3 and episode.status.value == "completed"


@in_loop
async def test_a_late_event_of_a_closed_episode_is_ignored(proc):
    events = episode_events("ep-4", "unit-d", turns=1)
    async with proc.assemble.test_context() as agent:
        await put_all(agent, events)
        await until(lambda: completed(proc), "the completed episode")
        await put_all(agent, [events[-1], events[1]])
        marker = episode_events("ep-5", "unit-d", turns=1)
        await put_all(agent, marker)  # processed after the late events
        await until(lambda: len(completed(proc)) == 2, "the next episode")
    assert [ep.episode_id for _, ep in completed(proc)] == ["ep-4", "ep-5"]


@in_loop
async def test_bad_events_go_to_the_dlq_with_their_reason_and_good_ones_keep_flowing(proc):
    topic = proc.settings.topics.trajectories
    ns = "unit-dlq"
    good = episode_events("ok-1", ns)
    schema_bad = {**json.loads(good[1].to_bytes()), "kind": "teleport"}
    oversize = episode_events("big", ns, response="y" * 5000)[1]
    conflict = episode_events("ok-1", "other-namespace")[1].model_copy(update={"event_id": "conflict", "seq": 7})
    before = {r: counter("oel_events_dead_lettered_total", topic=topic, reason=r) for r in ("not_json", "schema", "too_large")}
    async with proc.assemble.test_context() as agent:
        await agent.put(b"{not json", key=b"x", partition=1)
        await put_all(agent, good[:2])
        await agent.put(json.dumps(schema_bad).encode(), key=b"ok-1", partition=2)
        await agent.put(oversize.to_bytes(), key=b"big")
        await agent.put(good[2].to_bytes(), key=b"someone-else")  # key is not the episode id
        await put_all(agent, [conflict])
        await put_all(agent, good[2:])
        await until(lambda: completed(proc), "the valid episode")
        await until(lambda: len(dead(proc)) == 5, "five dead letters")
    reasons = [d.headers[ERROR_HEADER].decode() for d in dead(proc)]
    assert "not valid JSON" in reasons[0]
    assert "kind" in reasons[1]
    assert "over the limit of 4096" in reasons[2]
    assert "not the episode id" in reasons[3]
    assert "differs from the episode's" in reasons[4]
    assert dead(proc)[0].value == b"{not json" and dead(proc)[0].key == b"x"  # the original record
    assert dead(proc)[0].headers[SOURCE_HEADER].decode() == f"{topic}/1/0"
    after = {r: counter("oel_events_dead_lettered_total", topic=topic, reason=r) for r in before}
    assert {r: after[r] - before[r] for r in before} == {"not_json": 1, "schema": 3, "too_large": 1}
    [(_, episode)] = completed(proc)
    assert episode.episode_id == "ok-1" and len(episode.steps) == 2


def stub_batch_stage(proc, run_batch) -> tuple[list[str], list]:
    """Replace the extraction stage's KB work with ``run_batch(namespace, batch)``; returns the namespaces whose KB
    state was saved and the records released as acked (both filled as the stage runs)."""
    saved: list[str] = []
    acked: list = []

    async def release(manual, done: list) -> None:
        acked.extend(done)

    proc._run_batch = run_batch
    proc._save_kb_state = lambda namespace, state, event: saved.append(namespace)
    proc._release = release
    return saved, acked


@in_loop
async def test_a_flush_record_extracts_the_pending_batch_it_names(proc):
    """oel.episodes carries episodes and flush records (processors/records.py); a flush extracts the pending
    batch only if that batch still starts with the episode it names; flushes written as plain JSON by earlier
    versions of the processor read the same."""
    from types import SimpleNamespace

    from oel.episodes import add_event, close
    from processors.records import BatchFlush

    class Record:  # an event of oel.episodes, as much of it as the stage reads
        def __init__(self, value: bytes):
            self.message = SimpleNamespace(key=b"unit-f", value=value)

    record = Record

    ran: list[tuple[str, list[str]]] = []

    async def run_batch(namespace: str, batch) -> KBState:
        ran.append((namespace, [ep.episode_id for ep in batch.episodes]))
        return KBState(namespace=namespace)

    saved, acked = stub_batch_stage(proc, run_batch)
    buffer = None
    for event in episode_events("ep-f", "unit-f", turns=1):
        buffer, _ = add_event(buffer, event, 0.0)
    episode = close(buffer, abandoned=False)
    first = record(episode.model_dump_json().encode())
    assert await proc._extract_one(first, None) == [], "waits for its batch (batch_size 8)"
    stale = record(BatchFlush(flush="another-episode").to_bytes())
    assert await proc._extract_one(stale, None) == [stale] and ran == []
    flush = record(json.dumps({"flush": "ep-f"}).encode())
    assert await proc._extract_one(flush, None) == [flush], "the flush record is acked (released after the batch's records)"
    await until(lambda: not proc.running, "the batch's task")
    assert ran == [("unit-f", ["ep-f"])] and saved == ["unit-f"] and acked == [first], "its task extracted, saved and acked it"
    assert "unit-f" not in proc.pending


@in_loop
async def test_control_commands_abandon_an_idle_episode_and_purge_its_tombstone(proc):
    from processors.records import ControlCommand

    async with proc.assemble.test_context() as agent:
        await put_all(agent, episode_events("ep-c", "unit-c", turns=2)[:-1])
        await until(lambda: proc.episodes.get("ep-c"), "the open episode in the table")
    proc.open["ep-c"].received_at -= proc.settings.processor.abandon_after_s  # idle for long enough
    async with proc.control_agent.test_context() as control:
        await control.put(ControlCommand(op="abandon", episode_id="ep-c").model_dump(), key=b"ep-c", partition=0)
        [(_, episode)] = await until(lambda: completed(proc), "the abandoned episode")
        assert episode.status.value == "abandoned" and len(episode.steps) == 2
        assert "closed_at" in proc.episodes["ep-c"]
        await control.put(ControlCommand(op="purge", episode_id="ep-c").model_dump(), key=b"ep-c", partition=0)
        await until(lambda: proc.episodes.get("ep-c") is None, "the purged tombstone")


@in_loop
async def test_batches_of_two_namespaces_run_side_by_side_and_one_namespaces_in_order(proc):
    """A namespace's batch is extracted in a task of its own: another namespace's batch runs meanwhile, the
    same namespace's next batch waits for it (it builds on the KB state the first one writes)."""
    from types import SimpleNamespace

    from oel.episodes import add_event, close
    from processors.records import BatchFlush

    class Record:
        def __init__(self, key: str, value: bytes):
            self.message = SimpleNamespace(key=key.encode(), value=value)

    def episode_record(eid: str, ns: str) -> Record:
        buffer = None
        for event in episode_events(eid, ns, turns=1):
            buffer, _ = add_event(buffer, event, 0.0)
        return Record(ns, close(buffer, abandoned=False).model_dump_json().encode())

    processor = proc
    started: list[str] = []
    finish: dict[str, asyncio.Event] = {}

    async def run_batch(namespace: str, batch) -> KBState:
        first = batch.episodes[0].episode_id
        started.append(first)
        await finish.setdefault(first, asyncio.Event()).wait()
        return KBState(namespace=namespace)

    stub_batch_stage(processor, run_batch)

    async def batch_of(eid: str, ns: str) -> None:
        await processor._extract_one(episode_record(eid, ns), None)
        await processor._extract_one(Record(ns, BatchFlush(flush=eid).to_bytes()), None)

    await batch_of("a-1", "unit-a")
    await batch_of("b-1", "unit-b")
    await until(lambda: started == ["a-1", "b-1"], "both namespaces' first batches running at once")
    second_a = asyncio.create_task(batch_of("a-2", "unit-a"))
    await asyncio.sleep(0.1)
    assert started == ["a-1", "b-1"] and not second_a.done(), "a-2 waits for a-1"
    finish.setdefault("a-1", asyncio.Event()).set()
    await until(lambda: started == ["a-1", "b-1", "a-2"], "a-2 once a-1 is in the KB")
    await second_a
    for ev in ("b-1", "a-2"):
        finish.setdefault(ev, asyncio.Event()).set()
    await until(lambda: not processor.running, "every batch done")


@in_loop
async def test_a_batch_that_ends_after_its_partitions_moved_leaves_its_records_to_the_replay(proc):
    """Partitions revoked while a batch is extracted: its KB state is not written and its records are not
    acked (their next owner replays them into the same batch; every store write is idempotent)."""
    from types import SimpleNamespace

    from processors.app import PendingBatch

    release = asyncio.Event()

    async def run_batch(namespace: str, batch) -> KBState:
        await release.wait()
        return KBState(namespace=namespace)

    saved, acked = stub_batch_stage(proc, run_batch)
    for revoke in (False, True):
        record = SimpleNamespace(message=SimpleNamespace(key=b"unit-r", value=b"{}"))
        proc.pending["unit-r"] = PendingBatch(since=0.0, events=[record])
        await proc._start_batch("unit-r", None)
        if revoke:
            await proc._on_revoked()
        release.set()
        await until(lambda: not proc.running, "the batch's task")
        release.clear()
    assert saved == ["unit-r"] and len(acked) == 1, "only the batch that ended before the revocation was saved and acked"
