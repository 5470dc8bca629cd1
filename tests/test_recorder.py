"""The trajectory recorder against the real broker.

Broker failures are real: a TCP proxy (:class:`KafkaProxy`) sits between the recorder and the
broker and the tests stall it, cut it, or drop the broker's produce acknowledgements, so the producer
really retries, really blocks and really loses its connection. No mocks.
"""

from __future__ import annotations

import asyncio
import os
import select
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter, defaultdict
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from oel.ops.topics import admin_client, ensure_topics
from oel.schemas import ChatMessage, EventKind, TrajectoryEvent, decode
from oel.settings import Settings
from oel.topics import TopicSpec
from producers import (
    ABANDONED_PREFIX,
    BufferFull,
    InvalidEvent,
    Recorder,
    RecorderClosed,
    UndeliveredEvents,
)

REPO = Path(__file__).resolve().parent.parent

# --- helpers ------------------------------------------------------------------------------------------


def make_topic(settings: Settings, name: str, partitions: int = 3) -> str:
    ensure_topics(admin_client(settings.kafka), [TopicSpec(name, partitions, 1, {"retention.ms": "3600000"})])
    return name


def read_topic(settings: Settings, topic: str, timeout_s: float = 30.0) -> list:
    """Every message of ``topic`` (read directly from the broker, up to its end offsets now)."""
    c = Consumer({**settings.kafka.client_config(), "group.id": f"read-{uuid.uuid4().hex[:8]}", "enable.auto.commit": False})
    try:
        md = c.list_topics(topic, timeout=10).topics[topic]
        ends = {p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in md.partitions}
        todo = {p: end for p, end in ends.items() if end > 0}
        c.assign([TopicPartition(topic, p, 0) for p in todo])
        out = []
        deadline = time.monotonic() + timeout_s
        while todo:
            assert time.monotonic() < deadline, f"timed out reading {topic}: partitions {sorted(todo)} not read to the end"
            msg = c.poll(0.5)
            if msg is None:
                continue
            assert msg.error() is None, msg.error()
            out.append(msg)
            if msg.offset() + 1 >= todo.get(msg.partition(), 0):
                todo.pop(msg.partition(), None)
        return out
    finally:
        c.close()


def wait_until(condition, timeout_s: float = 30.0, what: str = "condition"):
    """Poll ``condition`` until it returns a truthy value (returned) or the deadline passes."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.02)


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# --- a Kafka-aware TCP proxy -------------------------------------------------------------------------------


def _uvarint(buf: bytes, pos: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7


def _skip_tags(buf: bytes, pos: int) -> int:
    count, pos = _uvarint(buf, pos)
    for _ in range(count):
        _, pos = _uvarint(buf, pos)
        size, pos = _uvarint(buf, pos)
        pos += size
    return pos


def rewrite_metadata_ports(frame: bytearray, version: int, old_port: int, new_port: int) -> int:
    """Point the brokers of a Metadata response (``frame`` = size + body) at the proxy; returns how many.

    Layout (Kafka protocol): correlation id; response-header tags (v9+); throttle (v3+); brokers:
    [node_id int32, host string, port int32, rack nullable string (v1+), tags (v9+)]; the rest is
    unchanged. Ports have a fixed width, so the frame length does not change.
    """
    flexible = version >= 9
    pos = 8
    if flexible:
        pos = _skip_tags(frame, pos)
    if version >= 3:
        pos += 4
    if flexible:
        n, pos = _uvarint(frame, pos)
        n -= 1
    else:
        (n,), pos = struct.unpack_from(">i", frame, pos), pos + 4
    changed = 0
    for _ in range(max(n, 0)):
        pos += 4  # node id
        if flexible:
            length, pos = _uvarint(frame, pos)
            length -= 1
        else:
            (length,), pos = struct.unpack_from(">h", frame, pos), pos + 2
        pos += length  # host
        (port,) = struct.unpack_from(">i", frame, pos)
        if port == old_port:
            struct.pack_into(">i", frame, pos, new_port)
            changed += 1
        pos += 4
        if version >= 1:  # rack
            if flexible:
                length, pos = _uvarint(frame, pos)
                pos += max(length - 1, 0)
            else:
                (length,), pos = struct.unpack_from(">h", frame, pos), pos + 2
                pos += max(length, 0)
        if flexible:
            pos = _skip_tags(frame, pos)
    return changed


class _DropConnection(Exception):
    pass


class KafkaProxy:
    """A real TCP proxy in front of one Kafka broker that a test can stall, cut, and restore.

    Clients connect to the address a broker advertises in Metadata responses, not to the bootstrap
    address; the proxy rewrites the broker's port in Metadata responses to its own, so every
    connection of a client bootstrapped through it stays on it. (Enough for producers; consumer-group
    coordinators would also need FindCoordinator rewritten.)

    * :meth:`stall` keeps connections open and forwards nothing (a hung broker or network);
    * :meth:`cut` resets every connection and refuses new ones at once (the broker is down);
    * :meth:`drop_produce_acks` forwards the next ``n`` produce requests to the broker but, instead of
      returning their responses, drops the connection: the batch is written, the client never hears
      so, and retries it — the situation idempotence exists for;
    * :meth:`restore` forwards normally again.
    """

    def __init__(self, upstream: str):
        host, _, port = upstream.split(",")[0].rpartition(":")
        self.upstream = (host, int(port))
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        self._forwarding = threading.Event()
        self._forwarding.set()
        self._down = False
        self._drop_acks = 0
        self.acks_dropped = 0
        self.produce_requests = 0
        self.metadata_rewritten = 0
        self._conns: set[tuple[socket.socket, socket.socket]] = set()
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept_loop, name="kafka-proxy", daemon=True).start()

    # -- controls --------------------------------------------------------------------------------------

    def stall(self) -> None:
        self._forwarding.clear()

    def cut(self) -> None:
        self._down = True
        self._drop_all()

    def restore(self) -> None:
        self._down = False
        self._forwarding.set()

    def drop_produce_acks(self, n: int) -> None:
        with self._lock:
            self._drop_acks += n

    def close(self) -> None:
        self._closed = True
        self._forwarding.set()
        self._listener.close()
        self._drop_all()

    # -- plumbing ----------------------------------------------------------------------------------------

    def _drop_all(self) -> None:
        with self._lock:
            conns, self._conns = list(self._conns), set()
        for pair in conns:
            self._close_pair(pair)

    @staticmethod
    def _close_pair(pair) -> None:
        for s in pair:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                ready, _, _ = select.select([self._listener], [], [], 0.1)
                if not ready:
                    continue
                client, _ = self._listener.accept()
            except OSError:
                return
            if self._down:
                client.close()  # connection reset: the broker is down
                continue
            try:
                upstream = socket.create_connection(self.upstream, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            pair = (client, upstream)
            with self._lock:
                self._conns.add(pair)
            requests: dict[int, tuple[int, int]] = {}
            threading.Thread(target=self._pump, args=(pair, client, upstream, requests, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(pair, upstream, client, requests, False), daemon=True).start()

    def _pump(self, pair, src: socket.socket, dst: socket.socket, requests: dict, to_broker: bool) -> None:
        buf = bytearray()
        try:
            while not self._closed:
                if not self._forwarding.wait(0.1):
                    continue  # stalled: leave the bytes in the kernel's buffers
                ready, _, _ = select.select([src], [], [], 0.1)
                if not ready:
                    continue
                data = src.recv(65536)
                if not data:
                    break
                buf += data
                while len(buf) >= 4:
                    size = int.from_bytes(buf[:4], "big")
                    if len(buf) < 4 + size:
                        break
                    frame = bytearray(buf[: 4 + size])
                    del buf[: 4 + size]
                    if to_broker:
                        api_key, api_version, corr = struct.unpack_from(">hhi", frame, 4)
                        requests[corr] = (api_key, api_version)
                        if api_key == 0:
                            self.produce_requests += 1
                    else:
                        (corr,) = struct.unpack_from(">i", frame, 4)
                        api_key, api_version = requests.pop(corr, (-1, -1))
                        if api_key == 3:  # Metadata
                            host, port = self.upstream
                            self.metadata_rewritten += rewrite_metadata_ports(frame, api_version, port, self.port)
                        elif api_key == 0:  # Produce
                            with self._lock:
                                drop = self._drop_acks > 0
                                if drop:
                                    self._drop_acks -= 1
                                    self.acks_dropped += 1
                            if drop:
                                raise _DropConnection  # the broker wrote the batch; the client never hears so
                    dst.sendall(frame)
        except (OSError, ValueError, _DropConnection):  # ValueError: the other pump closed the socket
            pass
        with self._lock:
            self._conns.discard(pair)
        self._close_pair(pair)


@pytest.fixture
def proxy(kafka):
    p = KafkaProxy(kafka.kafka.bootstrap_servers)
    yield p
    p.close()


def settings_via(settings: Settings, proxy: KafkaProxy, **recorder: object) -> Settings:
    return settings.model_copy(
        update={
            "kafka": settings.kafka.model_copy(update={"bootstrap_servers": proxy.address}),
            "recorder": settings.recorder.model_copy(update=recorder),
        }
    )


def events_by_episode(messages) -> dict[str, list[tuple[TrajectoryEvent, object]]]:
    out: dict[str, list] = defaultdict(list)
    for m in messages:
        ev = decode(m.value(), TrajectoryEvent)
        assert m.key().decode() == ev.episode_id
        out[ev.episode_id].append((ev, m))
    return out


# --- order, validation, abandoned episodes -----------------------------------------------------------


def test_an_episodes_events_arrive_in_order_on_one_partition(kafka, unique):
    topic = make_topic(kafka, f"t-{unique}.trajectories", partitions=6)
    sent = []
    with Recorder(kafka, topic=topic, tap=sent.append) as rec:
        episodes = [rec.episode("orders", f"agent-{i}", "v1", task=f"task {i}") for i in range(8)]
        for ep in episodes:
            ep.start()
        for turn in range(4):  # interleave the episodes, as concurrent agents do
            for i, ep in enumerate(episodes):
                if turn < 1 + i % 4:
                    ep.step(f"prompt {turn}", f"response {turn}", action=f"a{turn}", feedback=f"fb {turn}")
        for ep in episodes:
            ep.end("done", success=True)
        for ep in episodes:
            ep.wait_delivered(30)
        assert rec.stats().delivered == len(sent)

    got = events_by_episode(read_topic(kafka, topic))
    assert set(got) == {ep.episode_id for ep in episodes}
    for i, ep in enumerate(episodes):
        evs = got[ep.episode_id]
        assert len({m.partition() for _, m in evs}) == 1, "an episode's events must share one partition"
        evs.sort(key=lambda em: em[1].offset())
        assert [e.seq for e, _ in evs] == list(range(len(evs))), "offset order must be seq order"
        kinds = [e.kind for e, _ in evs]
        assert kinds == [EventKind.start] + [EventKind.step] * (1 + i % 4) + [EventKind.end]
        assert {e.model_version for e, _ in evs} == {"v1"}
        assert evs[1][0].step.prompt == [ChatMessage(role="user", content="prompt 0")]
    # the hand-assembled JSON is exactly the schema's own serialisation
    for raw in sent:
        assert decode(raw, TrajectoryEvent).to_bytes() == raw


def test_bad_events_raise_at_the_call_site_and_send_nothing(kafka, unique):
    topic = make_topic(kafka, f"t-{unique}.trajectories", partitions=1)
    with Recorder(kafka, topic=topic) as rec:
        with pytest.raises(InvalidEvent, match=r"namespace: String should match pattern"):
            rec.episode("Not A Namespace", "agent", "v1")
        with pytest.raises(InvalidEvent, match=r"agent_id: String should have at least 1 character"):
            rec.episode("ns", "", "v1")
        with rec.episode("ns", "agent", "v1") as ep:
            with pytest.raises(InvalidEvent, match=r"step\.prompt: List should have at least 1 item"):
                ep.step([], "response")
            with pytest.raises(InvalidEvent, match=r"step\.prompt\.0\.role"):
                ep.step([{"role": "robot", "content": "x"}], "response")
            with pytest.raises(InvalidEvent, match=r"step\.response: Input should be a valid string"):
                ep.step("prompt", None)
            with pytest.raises(InvalidEvent, match=r"over the limit of 1048576 .*OEL_TOPICS__MAX_EVENT_BYTES"):
                ep.step("prompt", "x" * 1_100_000)
            assert ep.step("prompt", "fine") == 1, "a rejected event consumes no sequence number"
            with pytest.raises(InvalidEvent, match=r"end\.outcome"):
                ep.end(None)
            ep.end("ok", success=True, wait=True)
            with pytest.raises(RecorderClosed, match="has ended"):
                ep.step("prompt", "late")
        assert rec.stats().invalid == 7
    evs = [decode(m.value(), TrajectoryEvent) for m in read_topic(kafka, topic)]
    assert [(e.seq, e.kind.value) for e in evs] == [(0, "start"), (1, "step"), (2, "end")]


def test_an_exception_in_the_block_ends_the_episode_as_abandoned(kafka, unique):
    topic = make_topic(kafka, f"t-{unique}.trajectories", partitions=1)
    with Recorder(kafka, topic=topic) as rec:
        with pytest.raises(ZeroDivisionError):
            with rec.episode("ns", "agent", "v1") as ep:
                ep.step("what is 1/0?", "let me compute")
                1 / 0  # noqa: B018
        ep.wait_delivered(30)
    evs = [decode(m.value(), TrajectoryEvent) for m in read_topic(kafka, topic)]
    assert [e.kind.value for e in evs] == ["start", "step", "end"]
    assert evs[-1].end.outcome == ABANDONED_PREFIX + "ZeroDivisionError: division by zero"
    assert evs[-1].end.success is None


# --- idempotence under real retries ------------------------------------------------------------------------


def _drop_acks_while_sending(proxy: KafkaProxy, send_wave, waves: int) -> None:
    for wave in range(waves):
        before = proxy.acks_dropped
        proxy.drop_produce_acks(1)
        send_wave(wave)
        wait_until(lambda before=before: proxy.acks_dropped > before, 30, "the proxy to drop a produce acknowledgement")


def test_retries_after_lost_acks_do_not_duplicate(kafka, unique, proxy):
    topic = make_topic(kafka, f"t-{unique}.trajectories", partitions=3)
    s = settings_via(kafka, proxy, linger_ms=5)
    rec = Recorder(s, topic=topic, producer_config={"retry.backoff.ms": 50})
    episodes = []

    def wave(i: int) -> None:
        for j in range(4):
            with rec.episode("ns", f"agent-{i}-{j}", "v1") as ep:
                for k in range(3):
                    ep.step(f"p{k}", f"r{k}")
                ep.end("done")
            episodes.append(ep)

    _drop_acks_while_sending(proxy, wave, waves=3)
    for ep in episodes:
        ep.wait_delivered(60)  # every event acknowledged in the end, after the retries
    report = rec.close(10)
    assert proxy.acks_dropped == 3 and proxy.metadata_rewritten > 0
    assert report.lost == 0 and report.delivered == 12 * 5

    messages = read_topic(kafka, topic)
    ids = Counter(decode(m.value(), TrajectoryEvent).event_id for m in messages)
    assert len(ids) == 60 and max(ids.values()) == 1, f"duplicated events: {[i for i, n in ids.items() if n > 1]}"
    for evs in events_by_episode(messages).values():
        evs.sort(key=lambda em: em[1].offset())
        assert [e.seq for e, _ in evs] == [0, 1, 2, 3, 4]


def test_control_the_same_lost_acks_duplicate_without_idempotence(kafka, unique, proxy):
    """Shows the fault above is real: a producer without idempotence writes the retried batches twice."""
    topic = make_topic(kafka, f"t-{unique}.control", partitions=1)
    p = Producer(
        {
            "bootstrap.servers": proxy.address,
            "enable.idempotence": False,
            "acks": "all",
            "linger.ms": 5,
            "retry.backoff.ms": 50,
            "max.in.flight.requests.per.connection": 1,
        }
    )

    def wave(i: int) -> None:
        for j in range(10):
            p.produce(topic, f"{i}-{j}".encode(), b"k")
        p.poll(0)

    _drop_acks_while_sending(proxy, wave, waves=3)
    assert p.flush(60) == 0
    values = Counter(m.value() for m in read_topic(kafka, topic))
    assert len(values) == 30
    assert sum(values.values()) > 30, "without idempotence the retries should have written duplicates"


# --- back-pressure ---------------------------------------------------------------------------------------


def test_backpressure_bounds_memory_under_a_stalled_broker(kafka, unique, proxy):
    topic = make_topic(kafka, f"t-{unique}.trajectories", partitions=1)
    proxy.stall()  # connections are accepted, nothing is forwarded: the broker looks hung
    s = settings_via(kafka, proxy, buffer_max_kbytes=1024, buffer_max_events=10_000, when_full="raise")
    rec = Recorder(s, topic=topic)
    response = "x" * 50_000  # ~50 KB events: 100 of them would be 5 MB
    before = rss_bytes()
    accepted = full = 0
    ep = rec.episode("ns", "agent", "v1")
    ep.start()
    for _ in range(2000):  # 100 MB if nothing bounded it
        try:
            ep.step("prompt", response)
            accepted += 1
        except BufferFull as exc:
            full += 1
            message = str(exc)
    growth = rss_bytes() - before
    stats = rec.stats()
    assert full == 2000 - accepted and accepted < 25, (accepted, full)  # 1 MB / 50 KB = 20 events
    assert stats.buffered == accepted + 1 and stats.full == full
    assert "buffer is full" in message and "1024 KB" in message
    assert growth < 30 * 1024 * 1024, f"memory grew by {growth / 2**20:.0f} MB"

    # the blocking policy: waits up to the timeout, then raises
    rec.when_full, rec.block_timeout_s = "block", 0.5
    t0 = time.monotonic()
    with pytest.raises(BufferFull, match="did not drain within 0.5s"):
        ep.step("prompt", response)
    assert time.monotonic() - t0 >= 0.5

    # ... and resumes as soon as the broker takes events again
    rec.block_timeout_s = 60
    result: dict = {}

    def blocked_send() -> None:
        try:
            result["seq"] = ep.step("prompt", response)
        except Exception as exc:  # noqa: BLE001
            result["error"] = exc

    sender = threading.Thread(target=blocked_send)
    sender.start()
    sender.join(0.5)
    assert sender.is_alive(), "the send should block while the buffer is full"
    proxy.restore()
    sender.join(60)
    assert not sender.is_alive() and "error" not in result, result
    ep.end("done")
    report = rec.close(30)
    assert report.lost == 0 and report.delivered == accepted + 3
    assert len(read_topic(kafka, topic)) == accepted + 3


def test_async_episode_waits_for_buffer_space_without_blocking_the_loop(kafka, unique, proxy):
    topic = make_topic(kafka, f"t-{unique}.trajectories", partitions=1)
    proxy.stall()
    s = settings_via(kafka, proxy, buffer_max_events=5, block_timeout_s=60)
    rec = Recorder(s, topic=topic)

    async def main() -> tuple[int, int]:
        ticks = 0
        stop = asyncio.Event()

        async def ticker() -> None:
            nonlocal ticks
            while not stop.is_set():
                ticks += 1
                await asyncio.sleep(0.01)

        tick_task = asyncio.create_task(ticker())
        async with rec.aepisode("ns", "agent", "v1") as ep:
            for k in range(4):
                await ep.step(f"p{k}", f"r{k}")  # start + 4 steps = 5 = the buffer's limit
            blocked = asyncio.create_task(ep.step("p4", "r4"))
            ticks_before = ticks
            await asyncio.sleep(0.3)  # the loop keeps running while the step waits for space
            assert not blocked.done() and ticks - ticks_before >= 10
            proxy.restore()
            await asyncio.wait_for(blocked, 60)
            await ep.end("done", success=True)  # awaits delivery of every event of the episode
        stop.set()
        await tick_task
        return ep.seq, rec.stats().delivered

    seq, delivered = asyncio.run(main())
    assert seq == 7 and delivered == 7
    assert rec.close(10).lost == 0
    assert [decode(m.value(), TrajectoryEvent).seq for m in read_topic(kafka, topic)] == list(range(7))


# --- loss is reported, never silent ----------------------------------------------------------------------------


def test_a_broker_down_at_close_is_reported_with_the_count(kafka, unique, proxy):
    topic = make_topic(kafka, f"t-{unique}.trajectories", partitions=1)
    rec = Recorder(settings_via(kafka, proxy), topic=topic)
    with rec.episode("ns", "agent", "v1") as ep:
        ep.step("p", "r")
        ep.end("done", wait=True)
    proxy.cut()
    with rec.episode("ns", "agent", "v1") as ep2:
        for k in range(3):
            ep2.step(f"p{k}", f"r{k}")
        ep2.end("done")
    t0 = time.monotonic()
    with pytest.raises(UndeliveredEvents) as err:
        rec.close(2.0)
    assert time.monotonic() - t0 < 10
    report = err.value.report
    assert (report.delivered, report.undelivered_at_close, report.failed_before_close, report.lost) == (3, 5, 0, 5)
    assert set(report.reasons) <= {"_PURGE_QUEUE", "_PURGE_INFLIGHT"}
    assert report.last_broker_error and proxy.address.split(":")[1] in report.last_broker_error
    assert f"{ep2.episode_id}.0" in report.lost_event_ids
    assert "5 trajectory events were not delivered" in str(err.value)
    assert "after a 2s flush at close" in str(err.value)
    assert rec.close() is report  # idempotent
    with pytest.raises(RecorderClosed):
        rec.episode("ns", "agent", "v1").start()


def test_delivery_failures_are_counted_per_episode_in_stats_metrics_and_at_close(kafka, unique, proxy):
    """A broker that stays away past the delivery timeout: the episode's wait raises DeliveryFailed with the
    reason, the recorder's stats and Prometheus counters count every failed event, and close reports them."""
    from oel.metrics import REGISTRY
    from producers.recorder import DeliveryFailed

    ns = f"ns-{unique}"[:60]

    def sample(name: str) -> float:
        return REGISTRY.get_sample_value(name, {"namespace": ns}) or 0.0

    topic = make_topic(kafka, f"t-{unique}.trajectories", partitions=1)
    rec = Recorder(settings_via(kafka, proxy, delivery_timeout_s=1.0), topic=topic)
    with rec.episode(ns, "agent", "v1") as ok:  # delivered: counted as sent, and as a played episode
        ok.step("p", "r")
        ok.end("done", success=True, wait=True, timeout_s=30)
    wait_until(
        lambda: sample("oel_recorder_events_sent_total") == 3 and sample("oel_agent_episodes_total") == 1,
        10,
        "the sent and played counters to be published",
    )
    proxy.cut()
    with rec.episode(ns, "agent", "v1") as ep:
        ep.step("p1", "r1")
        ep.step("p2", "r2")
        with pytest.raises(DeliveryFailed) as err:
            ep.end("done", success=False, wait=True, timeout_s=30)
    assert err.value.reasons == {"_MSG_TIMED_OUT": 4}
    assert f"4 events of episode {ep.episode_id} were not delivered" in str(err.value)
    stats = rec.stats()
    assert (stats.delivered, stats.failed, stats.reasons) == (3, 4, {"_MSG_TIMED_OUT": 4})
    wait_until(lambda: sample("oel_recorder_events_failed_total") == 4, 10, "the failed counter to be published")
    assert sample("oel_recorder_events_sent_total") == 3 and sample("oel_agent_episodes_total") == 2
    with pytest.raises(UndeliveredEvents) as closed:
        rec.close(1.0)
    report = closed.value.report
    assert (report.delivered, report.failed_before_close, report.undelivered_at_close) == (3, 4, 0)
    assert f"{ep.episode_id}.0" in report.lost_event_ids and "4 failed earlier" in str(closed.value)


def test_undelivered_events_at_interpreter_exit_are_logged(tmp_path):
    """A process that never closes its recorder: the atexit hook flushes, and reports what it could not deliver."""
    script = (
        "import logging; logging.basicConfig(level=logging.ERROR)\n"
        "from oel.settings import load_settings\n"
        "from producers import Recorder\n"
        "rec = Recorder(load_settings(kafka={'bootstrap_servers': '127.0.0.1:9'}), topic='nowhere')\n"
        "with rec.episode('ns', 'agent', 'v1') as ep:\n"
        "    ep.step('p', 'r')\n"
        "    ep.end('done')\n"
    )
    env = {**os.environ, "OEL_RECORDER__CLOSE_TIMEOUT_S": "1"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "trajectory recorder closed with loss: 3 trajectory events were not delivered" in proc.stderr
    assert "127.0.0.1:9" in proc.stderr


# --- the fast encoding path is the schema's own ---------------------------------------------------------------


def test_fast_payload_encoding_accepts_only_what_the_schema_accepts_and_writes_its_bytes():
    """No broker. Random payloads (valid and not): whenever the fast path encodes one, the schema's model
    accepts it and serialises it to the same bytes; whatever the fast path declines goes to the model."""
    import random

    from pydantic import ValidationError
    from pydantic_core import PydanticSerializationError

    from oel.schemas import EndPayload, StartPayload, StepPayload
    from producers.recorder import _fast_end, _fast_start, _fast_step

    rng = random.Random(7)
    alphabet = [chr(i) for i in range(0, 0x80)] + ["é", "\u2028", "\U0001f600", "\ud800", "\x7f", "\ufeff"]

    def text() -> str:
        return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 8)))

    def anything():
        return rng.choice([None, text(), text(), 3, 1.5, True, b"bytes", [text()], {"role": "user", "content": text()}])

    def message():
        m = {"role": rng.choice(["system", "user", "assistant", "assistant", "robot", "User"]), "content": text()}
        r = rng.random()
        if r < 0.05:
            m["extra"] = "x"
        elif r < 0.1:
            del m["content"]
        elif r < 0.15:
            m["content"] = 42
        elif r < 0.2:
            m = ChatMessage(role="user", content=text())
        return m

    def schema(model, **fields):
        try:
            return model.__pydantic_serializer__.to_json(model(**fields))
        except (ValidationError, PydanticSerializationError):
            return None

    taken = 0
    for _ in range(5000):
        prompt = rng.choice([text(), [message() for _ in range(rng.randint(0, 3))], anything()])
        kw = {
            "prompt": prompt,
            "response": rng.choice([text(), text(), anything()]),
            "action": rng.choice([None, text(), anything()]),
            "feedback": rng.choice([None, text(), anything()]),
        }
        fast = _fast_step(**kw)
        if fast is not None:
            taken += 1
            assert fast == schema(StepPayload, **kw), kw
        metadata = rng.choice([{}, {text(): text()}, {text(): text(), "k": 3}, None, [("a", "b")]])
        task = rng.choice([None, text(), anything()])
        fast = _fast_start(task, metadata)
        if fast is not None:
            assert fast == schema(StartPayload, task=task, metadata=metadata), (task, metadata)
        outcome, success = rng.choice([text(), anything()]), rng.choice([None, True, False, 1, "yes"])
        fast = _fast_end(outcome, success)
        if fast is not None:
            assert fast == schema(EndPayload, outcome=outcome, success=success), (outcome, success)
    assert taken > 1000  # the fast path is the common one
