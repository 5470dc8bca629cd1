"""Which upstream model answers a call: ``oel/<namespace>`` = the namespace's current promoted version.

One :class:`~producers.versions.VersionFollower` per namespace follows ``oel.model-versions``; its
:class:`~producers.adapters.AdapterLoader` hook loads each new version's adapter into the upstream
(vLLM's ``/v1/load_lora_adapter``) as soon as it is published, and a version met first here is loaded on
first use. A version whose adapter cannot be loaded is not served: the base model answers, and the
recorded version says so.
"""

from __future__ import annotations

import asyncio
import logging
import threading

from oel.model.vllm_backend import VLLMBackend
from oel.settings import Settings
from oel.store import ObjectStore
from oel.versions import BASE_VERSION
from producers.adapters import AdapterLoader
from producers.versions import VersionFollower

log = logging.getLogger(__name__)

MODEL_PREFIX = "oel/"


class ModelResolver:
    """Maps a call's model name to (the version recorded, the model name the upstream serves)."""

    def __init__(self, settings: Settings, store: ObjectStore, backend: VLLMBackend):
        self.settings = settings
        self.backend = backend
        self.loader = AdapterLoader(backend, store)
        # OEL_MODEL__ADAPTERS=served: the upstream's own adapter sync loads versions (Kubernetes: the proxy refuses
        # the admin API); a version is answered by its adapter once the upstream lists it
        self.served = getattr(settings.model, "adapters", "load") == "served"
        self._followers: dict[str, VersionFollower] = {}
        self._lock = threading.Lock()

    async def resolve(self, namespace: str, model: object) -> tuple[str, str]:
        """(version, served model) for a new episode of ``namespace`` that asked for ``model``."""
        return await asyncio.to_thread(self._resolve, namespace, model if isinstance(model, str) else "")

    def _resolve(self, namespace: str, model: str) -> tuple[str, str]:
        base = self.backend.base_model
        if not model.startswith(MODEL_PREFIX):
            return (BASE_VERSION if model in ("", base) else model), (model or base)
        current = self._follower(namespace).current()
        if current is None or current.adapter_uri is None:
            return (current.version if current else BASE_VERSION), base
        if self._available(current):
            return current.version, current.version
        log.warning(
            "%s: serving the base model: the adapter of %s could not be %s",
            namespace,
            current.version,
            "found on the upstream" if self.served else "loaded",
        )
        return BASE_VERSION, base

    def _available(self, version) -> bool:
        if not self.served:
            return self.loader.load(version)
        try:
            return version.version in self.backend.list_adapters()
        except Exception as exc:  # noqa: BLE001 - the upstream cannot be asked: answer with the base model
            log.warning("cannot list the upstream's adapters: %s", exc)
            return False

    def _follower(self, namespace: str) -> VersionFollower:
        with self._lock:
            follower = self._followers.get(namespace)
            if follower is None:
                follower = VersionFollower(namespace, self.settings, on_change=None if self.served else self.loader).start()
                self._followers[namespace] = follower
            return follower

    def close(self) -> None:
        with self._lock:
            for follower in self._followers.values():
                follower.stop()
            self._followers.clear()
