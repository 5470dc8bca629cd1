"""Shared fixtures. Integration tests talk to the real local stack (`oel stack up`); a service that is
not reachable fails the test with a message naming it: nothing is skipped silently."""

from __future__ import annotations

import socket
import uuid

import pytest

from oel.settings import Settings, load_settings

# What a test needs, read from the fixtures it uses (a module or test may also carry the mark itself):
# `stack` = the running local stack; `tools` = a program the installer fetches (kustomize, promtool, Kafka's
# and MinIO's binaries, the vLLM server). `model` and `slow` are set by the modules that load the real model
# or run for minutes. `pytest -m "not stack and not model and not tools and not slow"` is the quick run.
FIXTURE_MARKS = {
    "kafka": "stack",
    "s3_store": "stack",
    "prometheus_url": "stack",
    "kustomize": "tools",
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        for fixture in getattr(item, "fixturenames", ()):
            mark = FIXTURE_MARKS.get(fixture)
            if mark and not item.get_closest_marker(mark):
                item.add_marker(mark)


@pytest.fixture(scope="session")
def settings() -> Settings:
    return load_settings()


def _reachable(hostport: str, timeout: float = 2.0) -> bool:
    host, _, port = hostport.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def kafka(settings: Settings) -> Settings:
    """The settings, after checking the Kafka broker answers."""
    from oel.ops.topics import KafkaUnavailable, admin_client

    try:
        admin_client(settings.kafka, timeout_s=10)
    except KafkaUnavailable as exc:
        pytest.fail(f"Kafka is not running ({exc}); start the local stack with `oel stack up`", pytrace=False)
    return settings


@pytest.fixture(scope="session")
def s3_store(settings: Settings):
    """An S3Store on the local MinIO, bucket created."""
    from oel.store import S3Store, StoreError

    if not _reachable(settings.s3.endpoint):
        pytest.fail(f"the S3 server (MinIO) at {settings.s3.endpoint} is not running; start it with `oel stack up`", pytrace=False)
    try:
        store = S3Store(settings.s3)
        store.ensure_bucket()
    except StoreError as exc:
        pytest.fail(f"the S3 server (MinIO) is not usable: {exc}", pytrace=False)
    return store


@pytest.fixture(scope="session")
def prometheus_url() -> str:
    import os

    port = os.environ.get("OEL_STACK_PROMETHEUS_PORT", "9090")
    if not _reachable(f"127.0.0.1:{port}"):
        pytest.fail(f"Prometheus at 127.0.0.1:{port} is not running; start it with `oel stack up`", pytrace=False)
    return f"http://127.0.0.1:{port}"


@pytest.fixture
def unique() -> str:
    """A short unique suffix for topic, group and key names, so tests never see each other's data."""
    return uuid.uuid4().hex[:10]


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run fastest on one torch thread (and do not suffer from a busy machine); restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
