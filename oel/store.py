"""The object store that holds knowledge bases, training data, adapters and manifests.

Objects are immutable JSON documents under deterministic keys: writing the same key with the same
content again is a no-op (that is what makes a replay after a crash safe), writing different content
under an existing key is an error. Two implementations share one interface: :class:`S3Store`
(MinIO or any S3 server, through the ``minio`` SDK) for the services, :class:`LocalStore` (a
directory) for the one-machine demo.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import urllib3
from minio import Minio
from minio.error import S3Error
from tenacity import RetryError, Retrying, retry_if_exception, stop_after_attempt, wait_exponential

from oel.settings import S3Settings

log = logging.getLogger(__name__)

SHA_META = "x-amz-meta-sha256"
_TRANSIENT_S3_CODES = {"InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout", "XMinioServerNotInitialized"}


class StoreError(RuntimeError):
    """Base of the store's errors."""


class StoreUnavailable(StoreError):
    """The store did not answer after every retry; nothing was written."""


class ImmutableObjectConflict(StoreError):
    """A key that already holds different content was written again."""


class ObjectNotFound(StoreError, KeyError):
    """No object under that key."""


def canonical_json(obj: Any) -> bytes:
    """The one byte form of a JSON document: sorted keys, no spaces, UTF-8 (so equal documents hash equal)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str).encode()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class ObjectStore(ABC):
    """Immutable JSON and binary objects under ``/``-separated keys."""

    @abstractmethod
    def put_bytes(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> bool:
        """Store ``data`` under ``key``; False if the identical object was already there."""

    @abstractmethod
    def get_bytes(self, key: str) -> bytes: ...

    @abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """Keys under ``prefix``, sorted."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    def put_json(self, key: str, obj: Any) -> bool:
        return self.put_bytes(key, canonical_json(obj), "application/json")

    def get_json(self, key: str) -> Any:
        return json.loads(self.get_bytes(key))

    @staticmethod
    def _check_key(key: str) -> str:
        if not key or key.startswith("/") or ".." in key.split("/") or "//" in key:
            raise ValueError(f"invalid object key {key!r}")
        return key


class S3Store(ObjectStore):
    """An S3 bucket through the MinIO SDK, with bounded retries and a clear error when the server stays down."""

    def __init__(self, s3: S3Settings):
        if s3.access_key is None or s3.secret_key is None:
            raise StoreError(
                "OEL_S3__ACCESS_KEY and OEL_S3__SECRET_KEY are not set "
                "(run `oel stack up` for a local MinIO, or set them for your S3 server)"
            )
        self.settings = s3
        self.endpoint = ("https://" if s3.secure else "http://") + s3.endpoint
        self.bucket = s3.bucket
        # urllib3's own retries are switched off: tenacity below decides, so that the number of
        # tries and the final error are ours and name the endpoint.
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=min(s3.timeout_s, 5.0), read=s3.timeout_s),
            retries=False,
            maxsize=16,
        )
        self.client = Minio(
            s3.endpoint,
            access_key=s3.access_key,
            secret_key=s3.secret_key.get_secret_value(),
            secure=s3.secure,
            region=s3.region,
            http_client=http,
        )

    def _call(self, what: str, fn, *args, **kwargs):
        def transient(exc: BaseException) -> bool:
            if isinstance(exc, S3Error):
                return exc.code in _TRANSIENT_S3_CODES
            return isinstance(exc, (urllib3.exceptions.HTTPError, OSError))

        retrying = Retrying(
            stop=stop_after_attempt(self.settings.attempts),
            wait=wait_exponential(multiplier=self.settings.backoff_s, max=10),
            retry=retry_if_exception(transient),
            before_sleep=lambda rs: log.warning("object store %s: %s failed (%s), retrying", self.endpoint, what, rs.outcome.exception()),
            reraise=False,
        )
        try:
            return retrying(fn, *args, **kwargs)
        except RetryError as exc:
            cause = exc.last_attempt.exception()
            raise StoreUnavailable(
                f"object store at {self.endpoint} unavailable: {what} failed {self.settings.attempts} times, last error: {cause}"
            ) from cause

    def unreachable(self) -> str | None:
        """One quick request, no retries: None if the bucket answers, else why not (``/readyz``)."""
        try:
            self.client.bucket_exists(self.bucket)
        except Exception as exc:
            return f"object store at {self.endpoint}: {type(exc).__name__}: {exc}"[:300]
        return None

    def ensure_bucket(self) -> bool:
        """Create the bucket if it does not exist; True if it was created."""
        if self._call("bucket_exists", self.client.bucket_exists, self.bucket):
            return False
        try:
            self._call("make_bucket", self.client.make_bucket, self.bucket)
        except S3Error as exc:
            if exc.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise
            return False
        return True

    def _stat(self, key: str):
        try:
            return self._call("stat", self.client.stat_object, self.bucket, key)
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchObject", "NotFound"):
                return None
            raise

    def put_bytes(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> bool:
        """One conditional PUT (``If-None-Match: *``): the server writes the object only if the key is free,
        so a new object costs one request. A 412 means the key is taken: one HEAD then tells the identical
        object (its sha256 metadata) from a conflict."""
        self._check_key(key)
        digest = sha256_hex(data)
        headers = {"Content-Type": content_type, "If-None-Match": "*", SHA_META: digest}
        try:
            # minio 7.2.20's put_object takes no extra headers; _put_object is the single-request PutObject it wraps
            self._call("put", self.client._put_object, self.bucket, key, data, headers)
        except S3Error as exc:
            if exc.code != "PreconditionFailed":
                raise
            existing = self._stat(key)
            if existing is not None and (existing.metadata or {}).get(SHA_META) == digest:
                return False
            raise ImmutableObjectConflict(f"s3://{self.bucket}/{key} already holds different content") from None
        return True

    def get_bytes(self, key: str) -> bytes:
        self._check_key(key)

        def read() -> bytes:
            resp = self.client.get_object(self.bucket, key)
            try:
                return resp.read()
            finally:
                resp.close()
                resp.release_conn()

        try:
            return self._call("get", read)
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchObject"):
                raise ObjectNotFound(f"s3://{self.bucket}/{key}") from None
            raise

    def list(self, prefix: str = "") -> list[str]:
        return sorted(
            self._call("list", lambda: [o.object_name for o in self.client.list_objects(self.bucket, prefix=prefix, recursive=True)])
        )

    def exists(self, key: str) -> bool:
        return self._stat(self._check_key(key)) is not None


class LocalStore(ObjectStore):
    """A directory as an object store: same semantics, no server (for the demo and offline use)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root / self._check_key(key)

    def put_bytes(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> bool:
        path = self._path(key)
        if path.exists():
            if path.read_bytes() == data:
                return False
            raise ImmutableObjectConflict(f"{path} already holds different content")
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)  # atomic: a crash leaves no half-written object
        return True

    def get_bytes(self, key: str) -> bytes:
        path = self._path(key)
        if not path.is_file():
            raise ObjectNotFound(str(path))
        return path.read_bytes()

    def list(self, prefix: str = "") -> list[str]:
        return sorted(k for k in self._walk() if k.startswith(prefix))

    def _walk(self) -> Iterator[str]:
        for path in self.root.rglob("*"):
            if path.is_file() and not path.name.startswith(".tmp-"):
                yield path.relative_to(self.root).as_posix()

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()
