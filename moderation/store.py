"""The object store: one interface, an S3/MinIO backend and a local-folder backend.

Keys are ``/``-separated relative paths (``references/cat.jpg``). Both
backends validate keys the same way, so a key that works in the embedded
default works on MinIO and vice versa, and no key can escape the store
(``..``, absolute paths, NUL or control bytes are refused).
"""

from __future__ import annotations

import io
import os
import re
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from urllib.parse import urlparse

from moderation.config import Settings
from moderation.errors import ConfigError, NotFoundError, StoreError

MAX_KEY_BYTES = 900  # S3 allows 1024; keep headroom for prefixes
MAX_SEGMENT_BYTES = 255  # a file name on the local store (NAME_MAX)
_BAD_KEY_CHARS = re.compile(r"[\x00-\x1f\x7f\\]")
_COPY_CHUNK = 8 << 20


def validate_key(key: str) -> str:
    """Return ``key`` if it is a safe relative object key, else raise ValueError."""
    if not isinstance(key, str) or not key:
        raise ValueError("object key must be a non-empty string")
    if len(key.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES:
        raise ValueError(f"object key longer than {MAX_KEY_BYTES} bytes")
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("object key is not valid UTF-8") from None
    if _BAD_KEY_CHARS.search(key):
        raise ValueError(f"object key has control characters or backslashes: {key!r}")
    if key.startswith("/"):
        raise ValueError(f"object key must be relative: {key!r}")
    parts = key.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"object key has empty, '.' or '..' segments: {key!r}")
    if any(len(p.encode("utf-8")) > MAX_SEGMENT_BYTES for p in parts):
        raise ValueError(f"object key has a segment longer than {MAX_SEGMENT_BYTES} bytes")
    return key


@dataclass(frozen=True)
class ObjectInfo:
    """One listed object: its key, size in bytes, last-modified time (UTC; None if unknown) and ETag.

    ``etag`` is the server's entity tag (S3; quotes stripped), or on the local
    store a stand-in from size and mtime in nanoseconds; "" where unknown.
    """

    key: str
    size: int
    modified: datetime | None
    etag: str = ""

    @property
    def fingerprint(self) -> str:
        """What changes when the object's bytes change, known from the listing alone ("" if unknown).

        Size plus ETag: an S3 ETag of a multipart upload is not an MD5 of the
        bytes, but it still changes whenever the object is written again.
        """
        return f"{self.size}:{self.etag}" if self.etag else ""


class ObjectStore(ABC):
    """Byte objects by key.

    Contract: ``put`` is atomic per object (a reader sees the old bytes or
    the new bytes, never a mix); ``get`` raises NotFoundError for a missing
    key and StoreError when the backend is unreachable; ``list`` yields keys
    under a prefix in lexicographic order.
    """

    url: str

    @abstractmethod
    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None: ...

    @abstractmethod
    def get(self, key: str) -> bytes: ...

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def size(self, key: str) -> int:
        """The object's size in bytes, without reading it; NotFoundError if absent."""

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[str]: ...

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove ``key``; a missing key is not an error."""

    @abstractmethod
    def locate(self, key: str, expires: timedelta = timedelta(hours=1)) -> str:
        """A link a person can open: a presigned URL (S3) or a file path (local)."""

    def entries(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Like :meth:`list`, with each object's size and last-modified time, in one listing.

        The fallback asks for each size and knows no times (``modified`` None): callers that
        delete by age must treat an unknown time as new.
        """
        for key in self.list(prefix):
            yield ObjectInfo(key, self.size(key), None)

    def put_file(self, key: str, path: Path, content_type: str = "application/octet-stream") -> None:
        """:meth:`put` of a local file's bytes, as atomic; the backends stream it, never reading it whole.

        For artifacts as large as an index at 10M references (gigabytes),
        which must not be held twice in memory. OSError if ``path`` cannot be read.
        """
        self.put(key, Path(path).read_bytes(), content_type)

    def get_file(self, key: str, path: Path) -> None:
        """Write the object's bytes to the local file ``path`` (replaced whole), streamed by the backends.

        NotFoundError for a missing key, StoreError when the backend is
        unreachable; ``path`` is left untouched on any failure.
        """
        data = self.get(key)
        _write_atomically(Path(path), lambda fh: fh.write(data))

    def check(self) -> None:
        """Raise StoreError with a hint if the store cannot be reached."""
        try:
            next(iter(self.list("__healthcheck__/")), None)
        except StoreError:
            raise


class LocalStore(ObjectStore):
    """A folder on disk (the embedded default). Writes go through a temp file and rename."""

    def __init__(self, root: Path):
        self.root = Path(root).resolve()
        self.url = f"file://{self.root}"
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        path = (self.root / validate_key(key)).resolve()
        if self.root not in path.parents:
            raise ValueError(f"object key escapes the store: {key!r}")
        return path

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomically(path, lambda fh: fh.write(data), prefix=".tmp-")

    def get(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return path.read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            raise NotFoundError(f"no object {key!r} in {self.url}") from None

    def put_file(self, key: str, path: Path, content_type: str = "application/octet-stream") -> None:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "rb") as src:
            _write_atomically(target, lambda fh: shutil.copyfileobj(src, fh, _COPY_CHUNK), prefix=".tmp-")

    def get_file(self, key: str, path: Path) -> None:
        source = self._path(key)
        try:
            src = open(source, "rb")
        except (FileNotFoundError, IsADirectoryError):
            raise NotFoundError(f"no object {key!r} in {self.url}") from None
        with src:
            _write_atomically(Path(path), lambda fh: shutil.copyfileobj(src, fh, _COPY_CHUNK))

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def size(self, key: str) -> int:
        try:
            return self._path(key).stat().st_size
        except FileNotFoundError:
            raise NotFoundError(f"no object {key!r} in {self.url}") from None

    def list(self, prefix: str = "") -> Iterator[str]:
        keys = []
        for dirpath, _, files in os.walk(self.root):
            for name in files:
                if name.startswith(".tmp-"):
                    continue
                rel = Path(dirpath, name).relative_to(self.root).as_posix()
                if rel.startswith(prefix):
                    keys.append(rel)
        yield from sorted(keys)

    def entries(self, prefix: str = "") -> Iterator[ObjectInfo]:
        for key in self.list(prefix):
            try:
                st = self._path(key).stat()
            except FileNotFoundError:  # deleted since the listing
                continue
            yield ObjectInfo(key, st.st_size, datetime.fromtimestamp(st.st_mtime, timezone.utc),
                             f"mtime_ns={st.st_mtime_ns}")

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def locate(self, key: str, expires: timedelta = timedelta(hours=1)) -> str:
        return str(self._path(key))


class S3Store(ObjectStore):
    """A bucket (optionally under a key prefix) on MinIO or any S3 server, via the ``minio`` client."""

    def __init__(self, endpoint: str, bucket: str, access_key: str, secret_key: str,
                 secure: bool = False, region: str | None = None, prefix: str = "",
                 create_bucket: bool = True):
        from minio import Minio
        from urllib3 import PoolManager, Retry, Timeout

        if not endpoint:
            raise ConfigError("MODERATION_S3_ENDPOINT is not set (host:port of the MinIO/S3 server)")
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.url = f"s3://{bucket}/{self.prefix}"
        self._endpoint = endpoint
        # Short timeouts and few retries: a dead server must fail a task in
        # seconds with a clear message, and Airflow's task retries do the rest.
        # maxsize: parallel small reads (the vector cache's manifests) reuse connections.
        http = PoolManager(timeout=Timeout(connect=5, read=60), maxsize=8,
                           retries=Retry(total=2, backoff_factor=0.3,
                                         status_forcelist=[500, 502, 503, 504]))
        self.client = Minio(endpoint, access_key=access_key or None, secret_key=secret_key or None,
                            secure=secure, region=region or None, http_client=http)
        if create_bucket:
            self._call("check bucket", self._ensure_bucket)

    def _ensure_bucket(self) -> None:
        if not self.client.bucket_exists(self.bucket):
            self.client.make_bucket(self.bucket)

    def _call(self, what: str, fn, *args, **kwargs):
        from minio.error import S3Error
        from urllib3.exceptions import HTTPError

        try:
            return fn(*args, **kwargs)
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchObject"):
                raise NotFoundError(f"no object {exc.object_name!r} in {self.url}") from None
            raise StoreError(f"S3 {what} failed on {self._endpoint}/{self.bucket}: {exc.code} {exc.message}") from exc
        except (HTTPError, OSError) as exc:
            raise StoreError(
                f"cannot reach the object store at {self._endpoint} ({what}): {exc}. "
                "Check that MinIO is running and MODERATION_S3_ENDPOINT / credentials are right."
            ) from exc

    def _key(self, key: str) -> str:
        return self.prefix + validate_key(key)

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        full = self._key(key)
        # S3 PUT is atomic per object: readers never see a partial body.
        self._call("put", self.client.put_object, self.bucket, full, io.BytesIO(data), len(data),
                   content_type=content_type)

    def put_file(self, key: str, path: Path, content_type: str = "application/octet-stream") -> None:
        # fput_object streams the file (multipart above its part size); the object appears only when complete.
        self._call("put", self.client.fput_object, self.bucket, self._key(key), str(path),
                   content_type=content_type)

    def get_file(self, key: str, path: Path) -> None:
        full = self._key(key)

        def _get() -> None:
            resp = self.client.get_object(self.bucket, full)
            try:
                _write_atomically(Path(path), lambda fh: shutil.copyfileobj(resp, fh, _COPY_CHUNK))
            finally:
                resp.close()
                resp.release_conn()

        self._call("get", _get)

    def get(self, key: str) -> bytes:
        full = self._key(key)

        def _get() -> bytes:
            resp = self.client.get_object(self.bucket, full)
            try:
                return resp.read()
            finally:
                resp.close()
                resp.release_conn()

        return self._call("get", _get)

    def exists(self, key: str) -> bool:
        try:
            self.size(key)
            return True
        except NotFoundError:
            return False

    def size(self, key: str) -> int:
        return int(self._call("stat", self.client.stat_object, self.bucket, self._key(key)).size)

    def list(self, prefix: str = "") -> Iterator[str]:
        yield from (e.key for e in self.entries(prefix))

    def entries(self, prefix: str = "") -> Iterator[ObjectInfo]:
        start = len(self.prefix)
        objs = self._call("list", lambda: list(self.client.list_objects(
            self.bucket, prefix=self.prefix + prefix, recursive=True)))
        found = [ObjectInfo(o.object_name[start:], int(o.size or 0), _utc(o.last_modified),
                            (o.etag or "").strip('"'))
                 for o in objs if not o.is_dir]
        yield from sorted(found, key=lambda e: e.key)

    def delete(self, key: str) -> None:
        self._call("delete", self.client.remove_object, self.bucket, self._key(key))

    def locate(self, key: str, expires: timedelta = timedelta(hours=1)) -> str:
        return self._call("presign", self.client.presigned_get_object, self.bucket, self._key(key),
                          expires=expires)


def _write_atomically(path: Path, write, prefix: str = ".part-") -> None:
    """Call ``write(fh)`` on a temp file beside ``path``, then rename it over ``path``; no trace on failure."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=prefix)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


def open_store(settings: Settings) -> ObjectStore:
    """The store named by ``settings.store_url`` (``file://PATH`` or ``s3://BUCKET[/prefix]``).

    Raises ConfigError for an unknown scheme or missing S3 settings.
    """
    url = urlparse(settings.store_url)
    if url.scheme in ("", "file"):
        if url.scheme and url.netloc not in ("", "localhost"):
            # file://data would otherwise drop "data" (the URL's host) and use the current folder
            raise ConfigError(f"MODERATION_STORE_URL={settings.store_url!r}: a file URL needs an absolute "
                              "path (file:///PATH); or give the folder as a plain path")
        return LocalStore(Path(url.path if url.scheme else settings.store_url))
    if url.scheme in ("s3", "minio"):
        if not url.netloc:
            raise ConfigError("MODERATION_STORE_URL must name a bucket: s3://BUCKET[/prefix]")
        return S3Store(settings.s3_endpoint, url.netloc, settings.s3_access_key,
                       settings.s3_secret_key, secure=settings.s3_secure,
                       region=settings.s3_region, prefix=url.path)
    raise ConfigError(f"MODERATION_STORE_URL={settings.store_url!r}: scheme must be file:// or s3://")


def read_location(store: ObjectStore, location: str) -> bytes:
    """An indexed image by its location: an absolute file path (a folder-built index) or an object key.

    A relative path that is no object key is read from disk as a last resort.
    Raises NotFoundError / OSError when neither exists; StoreError when the store is down.
    """
    path = Path(location)
    if path.is_absolute():
        return path.read_bytes()
    try:
        return store.get(location)
    except (NotFoundError, ValueError):
        if path.is_file():
            return path.read_bytes()
        raise
