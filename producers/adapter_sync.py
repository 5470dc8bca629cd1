"""Keep one vLLM server's LoRA adapters equal to the promoted model versions: the per-pod sidecar.

Every vLLM replica runs one :class:`AdapterSync` next to it (``oel adapters sync``, a second container of
the vLLM pod). It follows ``oel.model-versions`` for the namespaces it serves (one
:class:`~producers.versions.VersionFollower` each, so promotions, rollbacks and tombstones follow the
topic's one set of rules), downloads each version's adapter from the object store into a folder shared
with the vLLM container (an ``emptyDir`` mounted at the same path in both: vLLM reads the files by path),
and loads it through that pod's **own** ``http://127.0.0.1:8000/v1/load_lora_adapter`` (the download and
the load are :class:`~producers.adapters.AdapterLoader`'s, with its metrics). Nothing outside the pod can
load or unload adapters: vLLM listens on 127.0.0.1 only, and the proxy in front of it refuses the admin API.

What a replica serves, per namespace: the current version and the versions that were current before it,
up to ``keep`` (agents finish an episode on the version they started it with, so the previous version
must stay loaded for a while after a promotion). A version that is rolled back (the current version moves
back to an earlier one, or to the base model) is unloaded at once and never loaded again unless it is
promoted again.

Catching up: at start the followers read the compacted topic to its end (compaction keeps the last
version of each namespace), then one reconciliation loads what is missing. Reconciliation runs again after
every change and every ``resync_s`` seconds, comparing the wanted set with what the server lists on
``/v1/models``: a vLLM container that restarted in the pod (and so lost its adapters) gets them back within
``resync_s``. ``/readyz`` of the sidecar is 503 until the first reconciliation has loaded every wanted
adapter, so a new replica takes no traffic before it serves the current versions; later failures (store
down, a bad adapter) are logged and counted (``oel_adapter_loads_total{outcome="error"}``) and retried at
the next reconciliation, while the replica keeps serving what it has.

Unit-tested with a fake server (``tests/test_adapter_sync.py``); the same tests run against the real
vLLM CPU server, Kafka and MinIO when the local stack and ``infra/local/vllm.sh`` are up.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from oel import metrics
from oel.model.backend import Backend, BackendError
from oel.schemas import ModelVersion
from oel.store import ObjectStore
from producers.adapters import AdapterLoader

log = logging.getLogger(__name__)


class AdapterSync:
    """Reconciles ``backend``'s adapters (a :class:`~oel.model.vllm_backend.VLLMBackend` of this pod's server)
    with the promoted versions of ``namespaces`` (see the module docstring).

    ``follower_factory(namespace, on_change)`` makes a started-on-:meth:`start` follower; the default is
    :class:`~producers.versions.VersionFollower` on ``settings``. ``adapter_dir`` is the folder shared with
    the server (the same path in both containers)."""

    def __init__(
        self,
        namespaces: Iterable[str],
        backend: Backend,
        store: ObjectStore,
        adapter_dir: str | Path,
        *,
        settings=None,
        keep: int = 2,
        resync_s: float = 15.0,
        follower_factory: Callable[[str, Callable], object] | None = None,
    ) -> None:
        self.namespaces = list(dict.fromkeys(namespaces))
        if not self.namespaces:
            raise ValueError("adapter sync needs at least one namespace to follow")
        if keep < 1:
            raise ValueError("keep must be at least 1 (the current version)")
        self.backend = backend
        self.adapter_dir = Path(adapter_dir)
        self.loader = AdapterLoader(backend, store, cache_dir=self.adapter_dir)
        self.keep = keep
        self.resync_s = resync_s
        self._lock = threading.RLock()
        self._reconcile_lock = threading.Lock()
        self._wanted: dict[str, list[ModelVersion]] = {ns: [] for ns in self.namespaces}  # oldest first, current last
        self._known: set[str] = set()  # every version name of these namespaces seen: only those are ever unloaded
        self._rolled_back: set[str] = set()
        self._synced = False
        self._last_problem: str | None = "not reconciled yet"
        self._started = False
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        if follower_factory is None:
            from producers.versions import VersionFollower

            def follower_factory(ns: str, on_change: Callable) -> object:
                return VersionFollower(ns, settings, on_change=on_change)

        self.followers = {ns: follower_factory(ns, self._hook(ns)) for ns in self.namespaces}

    # -- following ------------------------------------------------------------------------------

    def _hook(self, namespace: str) -> Callable[[ModelVersion | None, ModelVersion | None], None]:
        def on_change(old: ModelVersion | None, new: ModelVersion | None) -> None:
            self.changed(namespace, old, new)

        return on_change

    def changed(self, namespace: str, old: ModelVersion | None, new: ModelVersion | None) -> None:
        """A follower's ``on_change``: the namespace's current version went from ``old`` to ``new``."""
        with self._lock:
            wanted = self._wanted[namespace]
            names = [v.version for v in wanted]
            back = new is None or new.version in names or (old is not None and new.ts < old.ts)
            if old is not None and back:
                # a rollback (or a tombstone): the version that was current is bad; unload it
                self._rolled_back.add(old.version)
                wanted[:] = [v for v in wanted if v.version != old.version]
                log.info("%s: %s rolled back to %s: unloading it", namespace, old.version, new.version if new else "the base model")
            if new is not None:
                self._rolled_back.discard(new.version)
                self._known.add(new.version)
                wanted[:] = [v for v in wanted if v.version != new.version] + [new]
                del wanted[: max(0, len(wanted) - self.keep)]
            if old is not None:
                self._known.add(old.version)
        if self._started:
            self._wake.set()

    def wanted(self) -> dict[str, list[str]]:
        """Per namespace, the version names this server should serve (oldest first, current last)."""
        with self._lock:
            return {ns: [v.version for v in vs if v.adapter_uri is not None] for ns, vs in self._wanted.items()}

    # -- reconciling ----------------------------------------------------------------------------

    def reconcile(self) -> bool:
        """Load what is wanted and missing, unload rolled-back and superseded versions; True when the server
        serves exactly every wanted adapter of these namespaces afterwards. One pass at a time (the loop's and a
        caller's never interleave)."""
        with self._reconcile_lock:
            return self._reconcile()

    def _reconcile(self) -> bool:
        with self._lock:
            wanted = {v.version: v for vs in self._wanted.values() for v in vs if v.adapter_uri is not None}
            known = set(self._known)
        try:
            served = set(self.backend.list_adapters())
        except BackendError as exc:
            self._last_problem = f"vLLM not reachable: {exc}"
            log.warning("adapter sync: %s", self._last_problem)
            return False
        ok = True
        for name, version in wanted.items():
            if name not in served:
                ok = self.loader.load(version) and ok
        for name in sorted((served & known) - set(wanted)):
            try:
                self.backend.unload_adapter(name)
                shutil.rmtree(self._folder(name), ignore_errors=True)
                log.info("adapter sync: unloaded %s", name)
            except BackendError as exc:
                ok = False
                log.warning("adapter sync: could not unload %s: %s", name, exc)
        try:
            served = set(self.backend.list_adapters())
        except BackendError as exc:
            self._last_problem = f"vLLM not reachable: {exc}"
            return False
        missing = sorted(set(wanted) - served)
        extra = sorted((served & known) - set(wanted))
        for ns, names in self.wanted().items():
            metrics.ADAPTERS_SERVED.labels(namespace=ns).set(sum(n in served for n in names))
        if missing or extra or not ok:
            self._last_problem = (
                "; ".join(
                    filter(
                        None,
                        [
                            f"not loaded: {', '.join(missing)}" if missing else "",
                            f"not unloaded: {', '.join(extra)}" if extra else "",
                        ],
                    )
                )
                or "a load or unload failed"
            )
            return False
        self._last_problem = None
        if not self._synced:
            log.info("adapter sync: in sync, serving %s", ", ".join(sorted(wanted)) or "the base model only")
        self._synced = True
        return True

    def _folder(self, name: str) -> Path:
        for vs in self._wanted.values():
            for v in vs:
                if v.version == name:
                    return self.adapter_dir / v.namespace / name
        matches = list(self.adapter_dir.glob(f"*/{name}"))
        return matches[0] if matches else self.adapter_dir / "_" / name

    def readiness_problem(self) -> str | None:
        """For ``/readyz``: None once the first reconciliation served every wanted adapter (and after)."""
        return None if self._synced else (self._last_problem or "not reconciled yet")

    def liveness_problem(self) -> str | None:
        """For ``/livez``: the reconcile loop and every follower thread must be running."""
        if self._thread is None or not self._thread.is_alive():
            return "the reconcile loop is not running"
        for ns, f in self.followers.items():
            thread = getattr(f, "_thread", None)
            if thread is not None and not thread.is_alive():
                return f"the version follower of {ns} stopped"
        return None

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self) -> AdapterSync:
        """Start the followers (each reads the topic to its end), reconcile once, then keep reconciling in a thread."""
        for ns in self.namespaces:
            metrics.init_namespace(ns)
        for f in self.followers.values():
            f.start()  # type: ignore[attr-defined]
        self._started = True
        self.reconcile()
        self._thread = threading.Thread(target=self._loop, name="oel-adapter-sync", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.resync_s)
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                self.reconcile()
            except Exception:  # noqa: BLE001 - the loop must survive anything one pass throws
                log.exception("adapter sync: reconciliation failed")

    def wait_synced(self, timeout_s: float = 60.0, poll_s: float = 0.2) -> None:
        """Block until a reconciliation leaves the server serving exactly the wanted adapters (tests)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.reconcile():
                return
            time.sleep(poll_s)
        raise TimeoutError(f"adapter sync: not in sync after {timeout_s:g}s ({self._last_problem})")

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        for f in self.followers.values():
            f.stop()  # type: ignore[attr-defined]
        self._started = False

    def __enter__(self) -> AdapterSync:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
