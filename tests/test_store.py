"""The object store contract, on the real S3 server (MinIO) and on a local directory."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from oel.settings import load_settings
from oel.store import ImmutableObjectConflict, LocalStore, ObjectNotFound, S3Store, StoreUnavailable


@pytest.fixture(params=[pytest.param("s3", marks=pytest.mark.stack), "local"])
def store(request, tmp_path):
    if request.param == "s3":
        return request.getfixturevalue("s3_store")
    return LocalStore(tmp_path / "store")


def test_put_get_list_and_idempotent_second_put(store, unique):
    prefix = f"test/{unique}/"
    doc = {"text": "Always end with 'Best regards'.", "n": 1, "nested": {"b": 2, "a": [1, 2]}}
    assert store.put_json(prefix + "items/a.json", doc) is True
    assert store.put_json(prefix + "items/a.json", dict(reversed(list(doc.items())))) is False  # same content: no-op
    store.put_json(prefix + "items/b.json", {"x": 2})
    store.put_bytes(prefix + "blob.bin", b"\x00\x01")
    assert store.get_json(prefix + "items/a.json") == doc
    assert store.get_bytes(prefix + "blob.bin") == b"\x00\x01"
    assert store.list(prefix + "items/") == [prefix + "items/a.json", prefix + "items/b.json"]
    assert store.list(prefix) == [prefix + "blob.bin", prefix + "items/a.json", prefix + "items/b.json"]
    assert store.exists(prefix + "items/b.json") and not store.exists(prefix + "items/c.json")


def test_different_content_under_an_existing_key_is_refused(store, unique):
    key = f"test/{unique}/immutable.json"
    store.put_json(key, {"v": 1})
    with pytest.raises(ImmutableObjectConflict):
        store.put_json(key, {"v": 2})
    assert store.get_json(key) == {"v": 1}


def test_missing_object_and_bad_keys(store, unique):
    with pytest.raises(ObjectNotFound):
        store.get_json(f"test/{unique}/nothing.json")
    for bad in ("", "/abs", "a/../b", "a//b"):
        with pytest.raises(ValueError):
            store.put_json(bad, {})


def test_store_that_stays_down_names_the_endpoint(settings):
    # A real refused connection: nothing listens on this port.
    s3 = load_settings(
        s3={
            **settings.s3.model_dump(),
            "endpoint": "127.0.0.1:1",
            "attempts": 3,
            "backoff_s": 0.01,
            "access_key": "nobody",
            "secret_key": "nothing-here",
        }
    ).s3
    store = S3Store(s3)
    t0 = time.monotonic()
    with pytest.raises(StoreUnavailable) as err:
        store.put_json("x/y.json", {"lost": False})
    assert "127.0.0.1:1" in str(err.value) and "3 times" in str(err.value)
    assert time.monotonic() - t0 < 30


@pytest.mark.stack
def test_racing_writers_of_one_key_leave_one_object(s3_store, unique):
    """The existence check and the write are one conditional request: of writers racing with different
    content under one key exactly one succeeds, the others are told of the conflict, never overwrite."""
    key = f"test/{unique}/raced.json"
    barrier = threading.Barrier(8)

    def write(n: int) -> str:
        barrier.wait()
        try:
            return "new" if s3_store.put_json(key, {"writer": n}) else "same"
        except ImmutableObjectConflict:
            return "conflict"

    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(write, range(8)))
    assert sorted(outcomes) == ["conflict"] * 7 + ["new"]
    assert s3_store.get_json(key) == {"writer": outcomes.index("new")}
