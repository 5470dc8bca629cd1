"""The per-vLLM-pod adapter sync (producers/adapter_sync.py, `oel adapters sync`).

Unit tests: a fake server that keeps a list of loaded adapters and reads each adapter's files at load time (as
vLLM does, by path), a local object store, and followers driven through the topic's own rules
(:class:`~producers.versions.VersionState`). The integration test at the end runs the same scenario on the real
Kafka, MinIO and vLLM CPU server (marks stack, model, tools)."""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from oel.model.backend import Backend, BackendError
from oel.schemas import ModelVersion, VersionStatus
from oel.store import LocalStore
from producers.adapter_sync import AdapterSync
from producers.versions import VersionState

T0 = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)


def publish_version(version: ModelVersion, settings) -> None:
    from oel.ops.versions import publish_version as publish

    publish(version, settings)


def rollback(bad: ModelVersion, to: ModelVersion, reason: str, settings) -> None:
    """A rollback as the registry publishes it: ``bad`` rolled back, then ``to`` promoted again."""
    from oel.versions import rollback_events

    for event in rollback_events(bad, to, reason):
        publish_version(event, settings)


def version(ns: str, name: str, n: int, status: str = "promoted", parent: str | None = None) -> ModelVersion:
    return ModelVersion(
        namespace=ns,
        version=name,
        adapter_uri=f"adapters/{ns}/{name}/",
        base_model="base",
        base_model_hash="sha256:0",
        parent_version=parent,
        status=VersionStatus(status),
        ts=T0 + timedelta(minutes=n),
    )


class FakeServer(Backend):
    """What the sync needs of a vLLM server: list, load (reading the files at that path), unload."""

    base_model = "base"

    def __init__(self) -> None:
        self.loaded: dict[str, dict] = {}
        self.down = False
        self.calls: list[str] = []

    def list_adapters(self) -> list[str]:
        if self.down:
            raise BackendError("vLLM server at http://127.0.0.1:8000 is unreachable")
        return sorted(self.loaded)

    def load_adapter(self, name: str, path: Path) -> None:
        self.calls.append(f"load {name}")
        self.loaded[name] = json.loads((Path(path) / "adapter_config.json").read_text())

    def unload_adapter(self, name: str) -> None:
        self.calls.append(f"unload {name}")
        self.loaded.pop(name, None)

    def restart(self) -> None:
        self.loaded.clear()

    # unused by the sync
    def generate(self, *a, **k):  # pragma: no cover
        raise NotImplementedError

    def score(self, *a, **k):  # pragma: no cover
        raise NotImplementedError


class FakeFollower:
    """A VersionFollower without Kafka: the same VersionState rules, on_change on every change."""

    def __init__(self, ns: str, on_change) -> None:
        self.state = VersionState(ns)
        self.on_change = on_change
        self._thread = threading.current_thread()

    def publish(self, v: ModelVersion | None) -> None:
        old, new = self.state.apply(v)
        if (old.version if old else None) != (new.version if new else None):
            self.on_change(old, new)

    def start(self):
        return self

    def stop(self) -> None:
        pass


def put_adapter(store: LocalStore, v: ModelVersion) -> None:
    store.put_bytes(f"{v.adapter_uri}adapter_config.json", json.dumps({"version": v.version}).encode())
    store.put_bytes(f"{v.adapter_uri}adapter_model.safetensors", b"weights of " + v.version.encode())


@pytest.fixture
def world(tmp_path: Path):
    store = LocalStore(tmp_path / "store")
    server = FakeServer()
    followers: dict[str, FakeFollower] = {}

    def factory(ns, on_change):
        followers[ns] = FakeFollower(ns, on_change)
        return followers[ns]

    def make(namespaces=("support",), keep=2):
        return AdapterSync(namespaces, server, store, tmp_path / "adapters", keep=keep, resync_s=3600, follower_factory=factory)

    return store, server, followers, make, tmp_path / "adapters"


def test_two_versions_then_a_rollback(world) -> None:
    store, server, followers, make, adapter_dir = world
    v1, v2 = version("support", "g0001-a", 1), version("support", "g0002-b", 2, parent="g0001-a")
    for v in (v1, v2):
        put_adapter(store, v)
    sync = make()
    sync.start()
    assert sync.readiness_problem() is None and server.loaded == {}  # nothing promoted yet: the base model
    f = followers["support"]
    f.publish(v1)
    sync.wait_synced()
    assert server.loaded == {"g0001-a": {"version": "g0001-a"}}
    assert (adapter_dir / "support" / "g0001-a" / "adapter_model.safetensors").read_bytes() == b"weights of g0001-a"
    f.publish(v2)
    sync.wait_synced()
    assert sorted(server.loaded) == ["g0001-a", "g0002-b"]  # the previous one stays for episodes in flight
    # rollback as `oel models rollback` publishes it: rolled_back for v2, then v1 promoted again
    f.publish(version("support", "g0002-b", 3, status="rolled_back", parent="g0001-a"))
    f.publish(version("support", "g0001-a", 4))
    sync.wait_synced()
    assert sorted(server.loaded) == ["g0001-a"]
    assert not (adapter_dir / "support" / "g0002-b").exists()
    assert sync.wanted() == {"support": ["g0001-a"]}
    sync.stop()


def test_keep_bounds_the_loaded_versions_and_a_restarted_server_catches_up(world) -> None:
    store, server, followers, make, _ = world
    vs = [version("support", f"g000{i}-x", i) for i in range(1, 5)]
    for v in vs:
        put_adapter(store, v)
    sync = make(keep=2).start()
    for v in vs:
        followers["support"].publish(v)
    sync.wait_synced()
    assert sorted(server.loaded) == ["g0003-x", "g0004-x"]
    server.restart()  # the vLLM container restarted in the pod: it lost its adapters
    assert not sync.reconcile() or sorted(server.loaded) == ["g0003-x", "g0004-x"]
    sync.wait_synced()
    assert sorted(server.loaded) == ["g0003-x", "g0004-x"]
    sync.stop()


def test_a_new_replica_is_not_ready_until_it_serves_the_current_versions(world) -> None:
    """Catch-up at start: the followers read the compacted topic first (here: published before start)."""
    store, server, followers, make, _ = world
    a, b = version("support", "g0001-a", 1), version("house-rules", "g0003-c", 2)
    put_adapter(store, a)  # b's files are not in the store (yet)
    sync = make(namespaces=("support", "house-rules"))
    followers["support"].publish(a)
    followers["house-rules"].publish(b)
    server.down = True
    sync.start()
    assert "vLLM not reachable" in sync.readiness_problem()
    server.down = False
    assert not sync.reconcile()
    assert "not loaded: g0003-c" in sync.readiness_problem()
    assert sorted(server.loaded) == ["g0001-a"]
    put_adapter(store, b)
    sync.wait_synced()
    assert sync.readiness_problem() is None and sorted(server.loaded) == ["g0001-a", "g0003-c"]
    server.down = True  # once in sync, a later outage does not take the replica out of its Service
    sync.reconcile()
    assert sync.readiness_problem() is None
    sync.stop()


def test_only_this_syncs_versions_are_unloaded_and_a_tombstone_unloads(world) -> None:
    store, server, followers, make, _ = world
    server.loaded["someone-elses"] = {}
    v1 = version("support", "g0001-a", 1)
    put_adapter(store, v1)
    sync = make().start()
    followers["support"].publish(v1)
    sync.wait_synced()
    followers["support"].publish(None)  # the namespace was deleted: back to the base model
    sync.wait_synced()
    assert sorted(server.loaded) == ["someone-elses"]
    sync.stop()


def test_liveness_reports_a_stopped_loop(world) -> None:
    *_, make, _ = world
    sync = make()
    assert "not running" in sync.liveness_problem()
    sync.start()
    assert sync.liveness_problem() is None
    sync.stop()
    assert "not running" in sync.liveness_problem()


def test_cli_is_registered_and_needs_a_namespace() -> None:
    from click.testing import CliRunner

    from oel.cli import cli

    result = CliRunner().invoke(cli, ["adapters", "sync", "--help"])
    assert result.exit_code == 0 and "--namespace" in result.output and "/readyz" in result.output
    result = CliRunner().invoke(cli, ["adapters", "sync"], env={"OEL_ADAPTER_SYNC_NAMESPACES": ""})
    assert result.exit_code != 0 and "--namespace" in result.output


# --- the real thing: Kafka, MinIO, the vLLM CPU server -------------------------------------------------


def _private_versions_topic(settings, unique: str):
    """Settings whose model-versions topic is a fresh one (created like `oel topics create` would)."""
    import dataclasses

    from oel.ops.topics import admin_client, ensure_topics
    from oel.topics import topic_specs

    topic = f"oel.model-versions.sync-{unique}"
    spec = next(s for s in topic_specs(settings) if s.name == settings.topics.model_versions)
    ensure_topics(admin_client(settings.kafka), [dataclasses.replace(spec, name=topic)])
    return settings.model_copy(update={"topics": settings.topics.model_copy(update={"model_versions": topic})})


@pytest.mark.stack
def test_sync_follows_the_real_topic_and_store(kafka, s3_store, unique: str, tmp_path: Path) -> None:
    """The real VersionFollower on Kafka and adapters in MinIO, the fake server: promotions, a rollback (its two
    events, as the registry publishes them), and a second sync started afterwards (a new replica) that catches up from the
    topic before it is ready."""
    settings = _private_versions_topic(kafka, unique)
    ns = f"sync-{unique}"
    vs = [version(ns, f"{ns}-g000{i}", i, parent=f"{ns}-g000{i - 1}" if i > 1 else None) for i in (1, 2, 3)]
    vs = [v.model_copy(update={"adapter_uri": f"test-adapters/{ns}/{v.version}/"}) for v in vs]
    for v in vs:
        put_adapter(s3_store, v)
    server = FakeServer()
    sync = AdapterSync([ns], server, s3_store, tmp_path / "a", settings=settings, keep=2, resync_s=1).start()
    try:
        publish_version(vs[0], settings)
        publish_version(vs[1], settings)
        _until(lambda: sorted(server.loaded) == [vs[0].version, vs[1].version], 30)
        publish_version(vs[2], settings)
        _until(lambda: sorted(server.loaded) == [vs[1].version, vs[2].version], 30)
        rollback(vs[2], vs[1], "test", settings)
        _until(lambda: sorted(server.loaded) == [vs[1].version], 30)
        assert server.loaded[vs[1].version] == {"version": vs[1].version}  # the files vLLM would read, from MinIO
    finally:
        sync.stop()
    fresh = FakeServer()
    late = AdapterSync([ns], fresh, s3_store, tmp_path / "b", settings=settings, keep=2, resync_s=1).start()
    try:
        assert late.readiness_problem() is None
        assert sorted(fresh.loaded) == [vs[1].version] and late.wanted() == {ns: [vs[1].version]}
    finally:
        late.stop()


@pytest.mark.stack
@pytest.mark.model
@pytest.mark.tools
@pytest.mark.slow
def test_sync_against_the_real_vllm_server_kafka_and_minio(kafka, s3_store, unique: str, tmp_path: Path) -> None:
    """Two promoted versions reach the server from the object store via the topic, a rollback unloads the bad
    one, and a second sync started afterwards (a new replica) catches up from the compacted topic."""
    from test_vllm_backend import _url, make_adapter

    from oel.model.vllm_backend import VLLMBackend

    settings = _private_versions_topic(kafka, unique)
    server = VLLMBackend(_url(settings))
    try:
        server.health()
    except BackendError as exc:
        pytest.fail(f"the vLLM server is not running ({exc}); start it with `bash infra/local/vllm.sh up`", pytrace=False)
    model_dir = Path(server.base_model)  # the local server serves the model folder by its path
    ns = f"sync-{unique}"
    names = [f"{ns}-g0001", f"{ns}-g0002"]
    vs = []
    for i, name in enumerate(names):
        local = make_adapter(model_dir, tmp_path / name, seed=i + 1)
        prefix = f"adapters/{ns}/{name}/"
        for f in local.iterdir():
            s3_store.put_bytes(prefix + f.name, f.read_bytes())
        vs.append(
            ModelVersion(
                namespace=ns,
                version=name,
                adapter_uri=prefix,
                base_model="base",
                base_model_hash="sha256:0",
                parent_version=names[i - 1] if i else None,
                status=VersionStatus.promoted,
            )
        )
    import time

    sync = AdapterSync([ns], server, s3_store, tmp_path / "shared", settings=settings, keep=1, resync_s=2).start()
    try:
        t0 = time.monotonic()
        publish_version(vs[0], settings)
        _until(lambda: server.list_adapters() and names[0] in server.list_adapters())
        t1 = time.monotonic()
        publish_version(vs[1], settings)
        _until(lambda: names[1] in server.list_adapters() and names[0] not in server.list_adapters())
        t2 = time.monotonic()
        rollback(vs[1], vs[0], "test", settings)
        _until(lambda: names[0] in server.list_adapters() and names[1] not in server.list_adapters())
        t3 = time.monotonic()
    finally:
        sync.stop()
    server.unload_adapter(names[0])  # a new replica: nothing loaded, the topic says g0001
    t4 = time.monotonic()
    late = AdapterSync([ns], server, s3_store, tmp_path / "shared2", settings=settings, keep=1, resync_s=2).start()
    print(
        f"publish -> served: first {t1 - t0:.2f}s, second (and the first unloaded) {t2 - t1:.2f}s, rollback {t3 - t2:.2f}s; "
        f"a new replica in sync at start after {time.monotonic() - t4:.2f}s"
    )
    try:
        assert late.readiness_problem() is None
        assert [a for a in server.list_adapters() if a.startswith(ns)] == [names[0]]
    finally:
        late.stop()
        server.unload_adapter(names[0])


def _until(cond, timeout_s: float = 60.0) -> None:
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.5)
    raise AssertionError("condition not met in time")


def test_agents_in_served_mode_wait_for_their_server_and_never_load_or_unload(monkeypatch) -> None:
    """OEL_MODEL__ADAPTERS=served (Kubernetes): an agent plays a new version once its server lists it and it has
    settled (the other replicas have had time to load it); a rollback target it played before at once; it never
    calls the load or unload API (the proxy refuses them)."""
    import time as _time
    from types import SimpleNamespace

    from reference.live_agent import LiveAgent

    server = FakeServer()
    clock = [1000.0]
    monkeypatch.setattr(_time, "monotonic", lambda: clock[0])
    agent = SimpleNamespace(
        served=True, settle_s=30.0, _first_seen={}, _played=set(), backend=server, namespace="ns", agent_id="a", serving="base", loader=None
    )
    usable = lambda v: LiveAgent._usable(agent, v)  # noqa: E731
    switch = lambda name: LiveAgent._switch(agent, name)  # noqa: E731
    v1, v2 = version("ns", "g0001-a", 1), version("ns", "g0002-b", 2)
    assert not usable(v1)  # not listed yet
    server.loaded["g0001-a"] = {}
    assert not usable(v1)  # listed, but only just seen
    clock[0] += 31
    assert usable(v1)
    switch("g0001-a")
    server.loaded["g0002-b"] = {}
    assert not usable(v2)
    clock[0] += 31
    assert usable(v2)
    switch("g0002-b")
    assert usable(v1)  # the rollback target: played before, still loaded (keep=2)
    switch("g0001-a")
    assert server.calls == [] and agent.serving == "g0001-a"
    server.down = True
    assert not usable(version("ns", "g0003-c", 3))  # the server cannot be asked: keep the current version


def make_fake_vllm():
    """A tiny HTTP server speaking vLLM's /health, /v1/models and /v1/(un)load_lora_adapter; returns (server, state)."""
    import http.server
    import socketserver

    state = {"loaded": {}, "calls": []}

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet
            pass

        def _send(self, code: int, body) -> None:
            data = json.dumps(body).encode() if not isinstance(body, bytes) else body
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path == "/health":
                return self._send(200, b"")
            if self.path == "/v1/models":
                data = [{"id": "base", "root": "/nonexistent/base"}]
                data += [{"id": n, "parent": "base", "root": p} for n, p in state["loaded"].items()]
                return self._send(200, {"object": "list", "data": data})
            return self._send(404, {"error": "no"})

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])) or b"{}")
            state["calls"].append((self.path, body))
            if self.path == "/v1/load_lora_adapter":
                if not (Path(body["lora_path"]) / "adapter_config.json").is_file():
                    return self._send(400, {"message": "no adapter there"})
                state["loaded"][body["lora_name"]] = body["lora_path"]
                return self._send(200, b"ok")
            if self.path == "/v1/unload_lora_adapter":
                state["loaded"].pop(body["lora_name"], None)
                return self._send(200, b"ok")
            return self._send(404, {"error": "no"})

    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, state


@pytest.mark.stack
def test_the_sidecar_command_syncs_a_server_and_reports_it_on_readyz(kafka, s3_store, unique: str, tmp_path: Path) -> None:
    """`oel adapters sync` as the container runs it: a process following the real topic, downloading from MinIO into
    --dir and calling the server's load endpoint with a path under it; /readyz 503 until in sync, then 200; /livez 200;
    SIGTERM ends it cleanly."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from test_processor import free_port
    from test_readiness import _get

    settings = _private_versions_topic(kafka, unique)
    ns = f"cli-{unique}"
    v = version(ns, f"{ns}-g0001", 1).model_copy(update={"adapter_uri": f"test-adapters/{ns}/g0001/"})
    put_adapter(s3_store, v)
    server, state = make_fake_vllm()
    port = free_port()
    env = {
        **os.environ,
        "OEL_TOPICS__MODEL_VERSIONS": settings.topics.model_versions,
        "OEL_METRICS__PORT": str(port),
        "OEL_ADAPTER_SYNC_NAMESPACES": ns,
        "PYTHONPATH": os.pathsep.join(sys.path),
    }
    with open(tmp_path / "sync.log", "wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "oel.cli",
                "adapters",
                "sync",
                "--dir",
                str(tmp_path / "shared"),
                "--vllm-url",
                f"http://127.0.0.1:{server.server_address[1]}",
                "--resync",
                "1",
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        answer = None
        while time.monotonic() < deadline and answer is None:
            try:
                answer = _get(f"http://127.0.0.1:{port}/livez")
            except OSError:
                time.sleep(0.3)
        assert answer is not None, (tmp_path / "sync.log").read_text()[-3000:]
        _until(lambda: _get(f"http://127.0.0.1:{port}/livez")[0] == 200, 30)
        assert _get(f"http://127.0.0.1:{port}/readyz")[0] == 200  # nothing promoted yet: in sync with the base model
        publish_version(v, settings)
        _until(lambda: v.version in state["loaded"], 30)
        path = Path(state["loaded"][v.version])
        assert (
            path.is_relative_to(tmp_path / "shared")
            and (path / "adapter_model.safetensors").read_bytes() == b"weights of " + v.version.encode()
        )
        status, text = _get(f"http://127.0.0.1:{port}/readyz")
        assert status == 200 and "adapters: ok" in text, text
        metrics_text = _get(f"http://127.0.0.1:{port}/metrics")[1]
        assert f'oel_adapters_served{{namespace="{ns}"}} 1.0' in metrics_text
        status = subprocess.run(
            [
                sys.executable,
                "-m",
                "oel.cli",
                "adapters",
                "status",
                "--namespace",
                ns,
                "--vllm-url",
                f"http://127.0.0.1:{server.server_address[1]}",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert status.returncode == 0 and f"{ns}: current {v.version} served" in status.stdout, status.stdout + status.stderr
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, (tmp_path / "sync.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
        server.shutdown()


def test_the_gateway_in_served_mode_answers_with_a_listed_adapter_and_never_loads(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from gateway.models import ModelResolver
    from oel.settings import load_settings

    settings = load_settings(model={"adapters": "served"})
    server = FakeServer()
    resolver = ModelResolver(settings, LocalStore(tmp_path), server)
    v = version("ns", "g0001-a", 1)
    resolver._followers["ns"] = SimpleNamespace(current=lambda: v, stop=lambda: None)  # noqa: SLF001
    assert resolver._resolve("ns", "oel/ns") == ("base", "base")  # noqa: SLF001 - not on the upstream yet
    server.loaded["g0001-a"] = {}
    assert resolver._resolve("ns", "oel/ns") == ("g0001-a", "g0001-a")  # noqa: SLF001
    assert server.calls == []
