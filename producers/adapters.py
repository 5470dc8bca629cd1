"""Load each new model version's LoRA adapter into an agent's backend as soon as it is announced.

A :class:`AdapterLoader` is a :class:`~producers.versions.VersionFollower` ``on_change`` hook::

    backend = make_backend(settings)
    loader = AdapterLoader(backend, S3Store(settings.s3))
    follower = VersionFollower("support-bot", settings, on_change=loader).start()

When the namespace's current version changes to one with an adapter, the loader copies the adapter
folder (every object under the version's ``adapter_uri``) out of the object store into ``cache_dir``
and loads it into the backend under the version's name (names are immutable: a version is loaded
once, never reloaded under the same name). Going back to the base model or to a version already
loaded needs no load. Each load is measured: ``oel_adapter_load_duration_seconds`` (download + load)
and ``oel_adapter_loads_total{outcome="ok"|"error"}``; a failed load is logged and counted, and the
agent keeps serving what it served before (the follower never stops on a hook's error).
"""

from __future__ import annotations

import logging
import tempfile
import threading
import time
from pathlib import Path

from oel import metrics
from oel.model.backend import Backend
from oel.schemas import ModelVersion
from oel.store import ObjectStore

log = logging.getLogger(__name__)


class AdapterLoader:
    """Follower hook that downloads and loads the adapter of every new current version (see the module docstring)."""

    def __init__(self, backend: Backend, store: ObjectStore, cache_dir: str | Path | None = None):
        self.backend = backend
        self.store = store
        self.cache_dir = Path(cache_dir) if cache_dir is not None else Path(tempfile.mkdtemp(prefix="oel-adapters-"))
        self._lock = threading.Lock()

    def __call__(self, old: ModelVersion | None, new: ModelVersion | None) -> None:
        if new is not None:
            self.load(new)

    def load(self, version: ModelVersion) -> bool:
        """Make ``version``'s adapter available in the backend; True when it is (now or already)."""
        if version.adapter_uri is None:
            return True  # the base model
        with self._lock:
            if version.version in self.backend.list_adapters():
                return True
            t0 = time.monotonic()
            try:
                path = self._download(version)
                self.backend.load_adapter(version.version, path)
            except Exception:  # noqa: BLE001 - counted and logged; the agent keeps its current adapter
                metrics.count_adapter_load(version.namespace, None, ok=False)
                log.exception("%s: could not load the adapter of %s from %s", version.namespace, version.version, version.adapter_uri)
                return False
            seconds = time.monotonic() - t0
        metrics.count_adapter_load(version.namespace, seconds)
        log.info("%s: adapter %s loaded in %.2f s", version.namespace, version.version, seconds)
        return True

    def _download(self, version: ModelVersion) -> Path:
        """The adapter's folder in the cache: every object under ``adapter_uri`` (taken as a folder, with or
        without its trailing '/'), never written outside that folder whatever the keys say."""
        prefix = (version.adapter_uri or "").rstrip("/") + "/"
        keys = self.store.list(prefix)
        if not keys:
            raise FileNotFoundError(f"no adapter files under {prefix!r} in the object store")
        out = (self.cache_dir / version.namespace / version.version).resolve()
        for key in keys:
            path = (out / key[len(prefix) :]).resolve()
            if not path.is_relative_to(out) or path == out:
                raise ValueError(f"adapter object {key!r} of {version.namespace}/{version.version} is not a file under {prefix!r}")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(self.store.get_bytes(key))
        return out
