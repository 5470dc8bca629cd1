"""The model-version registry on the real MinIO, and `oel models` publishing on a real Kafka topic."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from learner.policy import round_id
from learner.versions import ModelRegistry, RegistryError, VersionManifest, manifest_key, status_key
from oel.ops.topics import admin_client, ensure_topics
from oel.schemas import VersionStatus
from oel.settings import load_settings
from oel.topics import TopicSpec
from producers import VersionFollower


def make_version(reg: ModelRegistry, ns: str, kb_seq: int, parent: str | None, adapter_dir=None, **extra):
    kb = f"{kb_seq:06d}-{kb_seq:012x}"
    rid = round_id(ns, parent, kb)
    name, generation = reg.next_version_name(ns, rid, parent)
    manifest = VersionManifest(
        namespace=ns,
        version=name,
        generation=generation,
        round_id=rid,
        base_model="SmolLM2-135M-Instruct",
        base_model_hash="sha256:00",
        parent_version=parent,
        kb_version=kb,
        kb_versions=[kb],
        round_config={"steps": 2, "learning_rate": 1e-4},
        training={"last_loss": 0.1},
        **extra,
    )
    return reg.save_version(manifest, adapter_dir)


@pytest.fixture
def ns(unique) -> str:
    return f"reg-{unique}"


def adapter(tmp_path, payload: bytes):
    d = tmp_path / f"adapter-{payload.hex()}"
    d.mkdir()
    (d / "adapter_config.json").write_text('{"r": 4}')
    (d / "adapter_model.safetensors").write_bytes(payload)
    return d


def test_manifest_and_adapter_round_trip(s3_store, ns, tmp_path):
    reg = ModelRegistry(s3_store)
    record, created = make_version(reg, ns, 3, None, adapter(tmp_path, b"weights-1"), eval={"pass_rate": 0.25})
    assert created
    m = record.manifest
    assert m.version == f"g0001-{m.round_id}" and m.generation == 1
    assert m.adapter_uri.startswith(f"models/{ns}/{m.version}/adapter/") and m.adapter_uri.endswith("/")
    assert set(m.adapter_files) == {"adapter_config.json", "adapter_model.safetensors"}
    back = reg.get(ns, m.version)
    assert back.manifest == m and back.status is VersionStatus.candidate and back.history == []
    assert s3_store.exists(manifest_key(ns, m.version))
    out = reg.download_adapter(back, tmp_path / "out")
    assert (out / "adapter_model.safetensors").read_bytes() == b"weights-1"
    event = back.to_event()
    assert (event.version, event.adapter_uri, event.kb_version, event.round_id, event.eval) == (
        m.version,
        m.adapter_uri,
        m.kb_version,
        m.round_id,
        {"pass_rate": 0.25},
    )


def test_a_replayed_round_reuses_its_version(s3_store, ns, tmp_path):
    reg = ModelRegistry(s3_store)
    first, created = make_version(reg, ns, 5, None, adapter(tmp_path, b"attempt-1"))
    # The replay after a crash retrains: different adapter bytes, same round id -> the same version, nothing new.
    again, created_again = make_version(reg, ns, 5, None, adapter(tmp_path, b"attempt-2"))
    assert created and not created_again
    assert again.manifest == first.manifest
    assert len(reg.list(ns)) == 1
    assert reg.find_round(ns, first.manifest.round_id).manifest.version == first.manifest.version
    assert len([k for k in s3_store.list(f"models/{ns}/") if k.endswith("manifest.json")]) == 1


def test_list_show_lineage_and_status_history(s3_store, ns, tmp_path):
    reg = ModelRegistry(s3_store)
    v1, _ = make_version(reg, ns, 1, None)
    v2, _ = make_version(reg, ns, 2, v1.manifest.version)
    assert v2.manifest.generation == 2 and v2.manifest.parent_version == v1.manifest.version
    assert [r.manifest.version for r in reg.list(ns)] == [v1.manifest.version, v2.manifest.version]
    assert ns in reg.namespaces()
    assert reg.find(v2.manifest.version).manifest.namespace == ns
    assert reg.latest(ns).manifest.version == v2.manifest.version
    assert reg.current(ns) is None

    name = v1.manifest.version
    reg.record_status(ns, name, VersionStatus.promoted, "first")
    reg.record_status(ns, name, VersionStatus.rolled_back, "bad")
    hist = reg.history(ns, name)
    assert [(c.seq, c.status, c.reason) for c in hist] == [(0, VersionStatus.promoted, "first"), (1, VersionStatus.rolled_back, "bad")]
    assert reg.get(ns, name).status is VersionStatus.rolled_back
    # every change is its own object; the manifest is untouched
    assert s3_store.exists(status_key(ns, name, 0)) and s3_store.exists(status_key(ns, name, 1))
    assert reg.manifest(ns, name).status is VersionStatus.candidate

    reg.reject(ns, v2.manifest.version, "ood score fell")
    with pytest.raises(RegistryError, match="rejected"):
        reg.promote(ns, v2.manifest.version)
    with pytest.raises(RegistryError, match="no model version"):
        reg.get(ns, "g0009-nothing")


def _topic(settings, unique: str) -> str:
    topic = f"t-{unique}.model-versions"
    ensure_topics(admin_client(settings.kafka), [TopicSpec(topic, 1, 1, {"cleanup.policy": "compact", "min.compaction.lag.ms": "0"})])
    return topic


def test_models_cli_promote_and_rollback_are_seen_by_a_follower(kafka, s3_store, ns, unique, tmp_path, monkeypatch):
    from oel.cli import cli

    topic = _topic(kafka, unique)
    monkeypatch.setenv("OEL_TOPICS__MODEL_VERSIONS", topic)
    settings = load_settings(topics={"model_versions": topic})
    reg = ModelRegistry(s3_store)
    v1, _ = make_version(reg, ns, 1, None, adapter(tmp_path, b"v1"))
    v2, _ = make_version(reg, ns, 2, v1.manifest.version, adapter(tmp_path, b"v2"))
    n1, n2 = v1.manifest.version, v2.manifest.version
    runner = CliRunner()

    res = runner.invoke(cli, ["models", "promote", n1], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    with VersionFollower(ns, settings, topic=topic) as follower:
        assert follower.current().version == n1
        res = runner.invoke(cli, ["models", "promote", n2, "--namespace", ns], catch_exceptions=False)
        assert res.exit_code == 0, res.output
        assert follower.wait_for(lambda v: v is not None and v.version == n2, 30).adapter_uri == v2.manifest.adapter_uri

        res = runner.invoke(cli, ["models", "list", "--namespace", ns], catch_exceptions=False)
        assert res.exit_code == 0 and n1 in res.output and n2 in res.output
        current_line = next(line for line in res.output.splitlines() if n2 in line)
        assert current_line.startswith("*") and "promoted" in current_line

        res = runner.invoke(cli, ["models", "rollback", "--namespace", ns, "--reason", "test"], catch_exceptions=False)
        assert res.exit_code == 0, res.output
        assert f"{n2} -> {n1}" in res.output
        back = follower.wait_for(lambda v: v is not None and v.version == n1, 30)
        assert back.status is VersionStatus.promoted

    assert reg.get(ns, n2).status is VersionStatus.rolled_back
    assert reg.current(ns).manifest.version == n1
    # A follower that starts now (after compaction could have run) also serves v1.
    with VersionFollower(ns, settings, topic=topic) as late:
        assert late.current().version == n1

    res = runner.invoke(cli, ["models", "show", n2], catch_exceptions=False)
    doc = json.loads(res.output)
    assert doc["status"] == "rolled_back" and [h["status"] for h in doc["history"]] == ["promoted", "rolled_back"]
    assert doc["manifest"]["parent_version"] == n1

    # Rolling back to the version just rolled back is refused; rolling v1 back leaves the base model.
    res = runner.invoke(cli, ["models", "rollback", "--namespace", ns, "--to", n2])
    assert res.exit_code != 0 and "not a good version" in res.output, res.output
    assert reg.current(ns).manifest.version == n1
    res = runner.invoke(cli, ["models", "rollback", "--namespace", ns], catch_exceptions=False)
    assert res.exit_code == 0 and "the base model" in res.output
    with VersionFollower(ns, settings, topic=topic) as late:
        assert late.current() is None


def test_models_cli_errors_are_clear(s3_store, ns):
    from oel.cli import cli

    runner = CliRunner()
    res = runner.invoke(cli, ["models", "show", "g0001-missing", "--namespace", ns])
    assert res.exit_code != 0 and "no model version" in res.output
    res = runner.invoke(cli, ["models", "rollback", "--namespace", ns])
    assert res.exit_code != 0 and "no promoted version" in res.output
    res = runner.invoke(cli, ["models", "list", "--namespace", ns])
    assert res.exit_code == 0 and "no model versions" in res.output


# --- a round and the learner service, with a tiny random model (seconds, not minutes) -------------------


def _seed_namespace(store, ns: str, n_items: int = 3) -> list:
    """Two stored episodes and two KB snapshots for ``ns``; returns the ExperienceUpdates the processor would send."""
    from datetime import UTC, datetime

    from oel.episodes import CompletedEpisode, EpisodeStatus
    from oel.kb import ExperienceItem, KBState, append, approx_tokens, write_append
    from oel.schemas import EndPayload, ExperienceUpdate, StepPayload

    now = datetime.now(UTC)
    for e in range(2):
        ep = CompletedEpisode(
            namespace=ns,
            episode_id=f"ep{e}",
            agent_id="a",
            model_version="base",
            status=EpisodeStatus.completed,
            steps=[StepPayload(prompt=f"What colour is the sky? ({e}.{t})", response="blue") for t in range(2)],
            end=EndPayload(outcome="done"),
            started_at=now,
            ended_at=now,
        )
        store.put_json(ep.store_key, ep.model_dump(mode="json"))
    state, updates = KBState(namespace=ns), []
    for batch in (range(0, 2), range(2, n_items)):
        items = [
            ExperienceItem(
                id=f"i{i}",
                namespace=ns,
                text=f"Answer in one word ({i}).",
                source_episode_ids=["ep0"],
                extracted_by="base",
                variant="structured",
            )
            for i in batch
        ]
        state, snap, new, _ = append(state, items, episode_ids=["ep0"], budget=512, count=approx_tokens, as_of=now)
        write_append(store, snap, new)
        updates.append(
            ExperienceUpdate(namespace=ns, kb_version=snap.version, new_item_ids=[i.id for i in new], total_items=len(state.all_ids))
        )
    return updates


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from support.tiny_model import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


_FAST = {"steps": 2, "batch_size": 2, "max_new_tokens": 6, "num_threads": 1, "learning_rate": 1e-2}


def test_a_round_trains_stores_and_a_replay_publishes_nothing_new(s3_store, ns, tiny_model_dir, kafka, unique):
    from learner.policy import TriggerPolicy
    from learner.rounds import RoundRunner

    updates = _seed_namespace(s3_store, ns)
    topic = _topic(kafka, unique)
    settings = load_settings(model={"path": str(tiny_model_dir)}, learner={"experience_sets": 2}, topics={"model_versions": topic})
    policy = TriggerPolicy(min_new_items=3, cooldown_s=0)
    for u in updates:
        policy.observe(u)
    trigger = policy.due(ns, 0.0)
    runner = RoundRunner(s3_store, settings, auto_promote=True, config_overrides=_FAST)
    first = runner.run(trigger)
    assert first.created and first.status is VersionStatus.promoted and first.published is not None
    m = first.record.manifest
    assert m.round_id == trigger.round_id and m.kb_version == updates[-1].kb_version
    assert m.kb_versions == [updates[-1].kb_version, updates[0].kb_version]
    assert m.base_model_hash.startswith("sha256:") and m.round_config["steps"] == 2 and m.training["prefixes"] == 4
    assert "adapter_config.json" in m.adapter_files
    # The same trigger again (a restart after a crash): no training, no second version.
    again = runner.run(trigger)
    assert not again.created and again.record.manifest == m and again.published is None
    assert len(ModelRegistry(s3_store).list(ns)) == 1
    with VersionFollower(ns, settings, topic=topic) as f:
        assert f.current().version == m.version


def test_service_runs_a_round_and_commits_only_after_it(s3_store, ns, tiny_model_dir, kafka, unique):
    from confluent_kafka import Consumer, Producer, TopicPartition

    from learner.rounds import RoundRunner
    from learner.service import LearnerService

    updates = _seed_namespace(s3_store, ns)
    exp_topic = f"t-{unique}.experience"
    ensure_topics(admin_client(kafka.kafka), [TopicSpec(exp_topic, 1, 1), TopicSpec(exp_topic + ".dlq", 1, 1)])
    settings = load_settings(
        model={"path": str(tiny_model_dir)},
        topics={"experience": exp_topic},
        learner={"min_new_items": 3, "cooldown_s": 0, "group_id": f"g-{unique}"},
    )
    producer = Producer(kafka.kafka.client_config())
    for u in [updates[0], updates[0], updates[1]]:  # one delivered twice
        producer.produce(exp_topic, u.to_bytes(), ns)
    producer.produce(exp_topic, b"{not json", ns)
    producer.flush(15)

    runner = RoundRunner(s3_store, settings, config_overrides=_FAST)  # no auto-promote: a candidate
    states = []
    svc = LearnerService(
        settings,
        s3_store,
        runner=runner,
        on_round=lambda o: states.append(
            (svc.policy.state(ns).parent_version, svc.policy.state(ns).consolidated_kb_version, dict(svc.policy.state(ns).pending))
        ),
    )
    svc.run(max_rounds=1, poll_s=0.2)
    assert len(svc.rounds) == 1 and svc.rounds[0].status is VersionStatus.candidate
    version = svc.rounds[0].record.manifest.version
    # A candidate is no parent: the next round still starts from the base model, but this KB version is done.
    assert states == [(None, updates[-1].kb_version, {})]

    c = Consumer({**kafka.kafka.client_config(), "group.id": f"g-{unique}"})
    committed = c.committed([TopicPartition(exp_topic, 0)], timeout=10)[0].offset
    c.close()
    assert committed == 3  # the three updates, consolidated; the bad message after them is not yet read or is in the DLQ

    # A restarted service (same group) reads on, finds nothing new, and starts no second round.
    svc2 = LearnerService(settings, s3_store, runner=runner)
    import threading

    t = threading.Timer(3.0, svc2.stop)
    t.start()
    svc2.run(poll_s=0.2)
    t.cancel()
    assert svc2.rounds == []
    assert [r.manifest.version for r in ModelRegistry(s3_store).list(ns)] == [version]
    # The invalid message went to the DLQ with its reason, and was committed past.
    c = Consumer({**kafka.kafka.client_config(), "group.id": f"g-{unique}"})
    assert c.committed([TopicPartition(exp_topic, 0)], timeout=10)[0].offset == 4
    c.close()
    d = Consumer({**kafka.kafka.client_config(), "group.id": f"dlq-{unique}", "enable.auto.commit": False})
    d.assign([TopicPartition(exp_topic + ".dlq", 0, 0)])
    msg = d.poll(10)
    d.close()
    assert msg is not None and msg.value() == b"{not json"
    assert dict(msg.headers())["oel.error"].startswith(b"not valid JSON")


_CRASHING_LEARNER = """
import json, os, signal, sys
from learner.rounds import RoundRunner
from learner.service import LearnerService
from learner.versions import ModelRegistry
from oel.settings import load_settings
from oel.store import S3Store

settings = load_settings()
store = S3Store(settings.s3)
registry = ModelRegistry(store)
moment = sys.argv[2]
if moment == "after the manifest":  # before promotion, before the offsets are committed
    save = registry.save_version

    def save_then_die(*args, **kwargs):
        save(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGKILL)

    registry.save_version = save_then_die
else:  # "after publishing": the version is on the topic, its promotion not recorded in the registry
    record_status = registry.record_status

    def die_before_promoted(namespace, version, status, reason=None):
        if status.value == "promoted":
            os.kill(os.getpid(), signal.SIGKILL)
        return record_status(namespace, version, status, reason)

    registry.record_status = die_before_promoted
runner = RoundRunner(store, settings, registry=registry, config_overrides=json.loads(sys.argv[1]))
# The broker's minimum session timeout, so that the restarted learner need not wait 45 s for this member to expire.
LearnerService(settings, store, runner=runner, consumer_config={"session.timeout.ms": 6000}).run(poll_s=0.2)
"""


@pytest.mark.parametrize("moment", ["after the manifest", "after publishing"])
def test_kill_9_then_restart_publishes_exactly_one_version(moment, s3_store, ns, tiny_model_dir, kafka, unique, tmp_path):
    import os
    import subprocess
    import sys
    import threading
    import time
    import uuid

    from confluent_kafka import Consumer, Producer, TopicPartition

    from learner.rounds import RoundRunner
    from learner.service import LearnerService
    from oel.schemas import ModelVersion, decode

    updates = _seed_namespace(s3_store, ns)
    exp_topic, versions_topic = f"t-{unique}.experience", _topic(kafka, unique)
    ensure_topics(admin_client(kafka.kafka), [TopicSpec(exp_topic, 1, 1)])
    env = {
        **os.environ,
        "OEL_MODEL__PATH": str(tiny_model_dir),
        "OEL_TOPICS__EXPERIENCE": exp_topic,
        "OEL_TOPICS__MODEL_VERSIONS": versions_topic,
        "OEL_LEARNER__MIN_NEW_ITEMS": "3",
        "OEL_LEARNER__COOLDOWN_S": "0",
        "OEL_LEARNER__GROUP_ID": f"g-{unique}",
        "OEL_LEARNER__AUTO_PROMOTE": "true",
    }
    producer = Producer(kafka.kafka.client_config())
    for u in updates:
        producer.produce(exp_topic, u.to_bytes(), ns)
    producer.flush(15)

    script = tmp_path / "crashing_learner.py"
    script.write_text(_CRASHING_LEARNER)
    proc = subprocess.run(
        [sys.executable, str(script), json.dumps(_FAST), moment],
        env=env,
        cwd=str(tmp_path.parent),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -9, proc.stderr[-2000:]
    reg = ModelRegistry(s3_store)
    [crashed] = reg.list(ns)
    assert crashed.status is VersionStatus.candidate and crashed.history == []

    settings = load_settings(
        model={"path": str(tiny_model_dir)},
        topics={"experience": exp_topic, "model_versions": versions_topic},
        learner={"min_new_items": 3, "cooldown_s": 0, "group_id": f"g-{unique}", "auto_promote": True},
    )
    svc = LearnerService(settings, s3_store, runner=RoundRunner(s3_store, settings, config_overrides=_FAST))
    thread = threading.Thread(target=svc.run, kwargs={"poll_s": 0.2})
    thread.start()
    g = Consumer({**kafka.kafka.client_config(), "group.id": f"g-{unique}"})
    try:
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:  # the dead member's session expires, then the group rebalances
            if g.committed([TopicPartition(exp_topic, 0)], timeout=10)[0].offset == len(updates):
                break
            time.sleep(0.5)
    finally:
        svc.stop()
        thread.join(30)
    assert g.committed([TopicPartition(exp_topic, 0)], timeout=10)[0].offset == len(updates)
    g.close()
    assert svc.rounds == []  # nothing trained again
    [after] = reg.list(ns)
    assert after.manifest == crashed.manifest and after.status is VersionStatus.promoted

    c = Consumer({**kafka.kafka.client_config(), "group.id": f"read-{uuid.uuid4().hex[:8]}", "enable.auto.commit": False})
    c.assign([TopicPartition(versions_topic, 0, 0)])
    published = []
    while (msg := c.poll(2.0)) is not None:
        published.append(decode(msg.value(), ModelVersion))
    c.close()
    assert [(v.version, v.status) for v in published] == [(after.manifest.version, VersionStatus.promoted)]


def test_a_fenced_learner_replaces_its_consumer_and_goes_on(s3_store, kafka, unique, tmp_path):
    """A real fatal consumer error: another member joins with the learner's static instance id, which fences the
    learner's consumer (FENCED_INSTANCE_ID). The service must not stop: it starts a new consumer (fencing the
    intruder in turn) and keeps consuming; offsets it had not committed are read again."""
    import threading
    import time

    from confluent_kafka import Consumer, Producer, TopicPartition

    from learner.service import LearnerService

    topic, group = f"t-{unique}.experience", f"g-{unique}"
    ensure_topics(admin_client(kafka.kafka), [TopicSpec(topic, 1, 1), TopicSpec(topic + ".dlq", 1, 1)])
    settings = load_settings(topics={"experience": topic}, learner={"group_id": group, "instance_id": "learner-0"})
    svc = LearnerService(settings, s3_store)
    thread = threading.Thread(target=svc.run, kwargs={"poll_s": 0.2})
    thread.start()
    producer = Producer(kafka.kafka.client_config())
    watcher = Consumer({**kafka.kafka.client_config(), "group.id": group})

    def committed() -> int:
        return watcher.committed([TopicPartition(topic, 0)], timeout=10)[0].offset

    def send_invalid_and_wait(n: int, target: int) -> None:  # invalid updates are dead-lettered and committed past
        for _ in range(n):
            producer.produce(topic, b"{not json", b"k")
        producer.flush(15)
        deadline = time.monotonic() + 60
        while committed() != target and time.monotonic() < deadline and thread.is_alive():
            time.sleep(0.5)
        assert committed() == target and thread.is_alive()

    try:
        send_invalid_and_wait(2, 2)
        intruder = Consumer(
            {**kafka.kafka.client_config(), "group.id": group, "group.instance.id": "learner-0", "session.timeout.ms": 6000}
        )
        intruder.subscribe([topic])
        deadline = time.monotonic() + 60
        while not intruder.assignment() and time.monotonic() < deadline:
            intruder.poll(0.5)  # joins with the same instance id: the learner's member is fenced
        assert intruder.assignment(), "the intruder never joined"
        intruder.close()
        send_invalid_and_wait(2, 4)  # the learner came back with a new consumer and goes on
    finally:
        svc.stop()
        thread.join(30)
        watcher.close()
    assert not thread.is_alive()
