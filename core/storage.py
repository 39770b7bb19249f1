"""Object storage behind one small interface: a local directory or S3.

Both implementations use the same key layout (``datasets/...``, ``models/...``), so a
local root is a faithful mirror of a bucket. Clients are built when a Storage is
constructed, never at import time. Parquet goes through ``pyarrow.fs`` only (one
filesystem layer; s3fs trips over the empty "directory" objects pyarrow writes).
"""

from __future__ import annotations

import builtins
import errno
import functools
import hashlib
import io
import os
import posixpath
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq


class StorageError(RuntimeError):
    """Storage could not be reached or an object could not be read or written."""


class ObjectNotFound(StorageError, KeyError):
    """The requested key does not exist."""


class ObjectTooLarge(StorageError):
    """The object is bigger than the caller's ``max_bytes`` (it was not read in full)."""

    def __init__(self, url: str, size: int | None, max_bytes: int):
        shown = f"{size} bytes" if size is not None else "more bytes"
        super().__init__(f"{url} is {shown}, over the {max_bytes}-byte limit")
        self.size, self.max_bytes = size, max_bytes


class ObjectUnreadable(StorageError):
    """This one object cannot be read however often it is tried (archived to Glacier, a
    key longer than S3 allows, a local file without read permission); other objects can."""


# S3 error codes that concern one object, not the bucket or the credentials
_PER_OBJECT_CODES = frozenset({"InvalidObjectState", "KeyTooLongError"})


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    etag: str
    last_modified: datetime


def valid_key(key: str) -> bool:
    """No leading '/', no '..' and no empty segments: the same key on disk and on S3."""
    parts = key.split("/")
    return bool(key) and ".." not in parts and "" not in parts[:-1]


def _check_key(key: str) -> str:
    if not valid_key(key):
        raise ValueError(f"invalid object key {key!r}")
    return key


class Storage(Protocol):
    uri: str

    def get_bytes(self, key: str, max_bytes: int | None = None) -> bytes: ...
    def put_bytes(self, key: str, data: bytes, content_type: str | None = None) -> None: ...
    def put_file(self, key: str, local: Path, content_type: str | None = None) -> None: ...
    def put_if_absent(self, key: str, data: bytes, content_type: str | None = None) -> bool: ...
    def put_if_match(
        self, key: str, data: bytes, etag: str | None, content_type: str | None = None
    ) -> bool: ...
    def exists(self, key: str) -> bool: ...
    def head(self, key: str) -> ObjectInfo: ...
    def list(self, prefix: str) -> Iterator[ObjectInfo]: ...
    def list_keys(self, prefix: str) -> Iterator[str]: ...
    def copy(self, src: str, dst: str) -> None: ...
    def delete(self, key: str) -> None: ...
    def url_for(self, key: str) -> str: ...
    def arrow_fs(self) -> tuple[pafs.FileSystem, str]: ...
    def write_parquet(self, key: str, table: pa.Table, **kwargs: Any) -> None: ...
    def read_parquet(self, key: str, columns: builtins.list[str] | None = None) -> pa.Table: ...


class _ParquetMixin:
    """Parquet and JSON helpers shared by both storages."""

    def arrow_fs(self) -> tuple[pafs.FileSystem, str]:  # pragma: no cover - overridden
        raise NotImplementedError

    def put_bytes(self, key: str, data: bytes, content_type: str | None = None) -> None:
        raise NotImplementedError  # pragma: no cover

    def get_bytes(self, key: str, max_bytes: int | None = None) -> bytes:
        raise NotImplementedError  # pragma: no cover

    def write_parquet(self, key: str, table: pa.Table, **kwargs: Any) -> None:
        """Serialise in memory, then publish in one put (never a partial object)."""
        buf = io.BytesIO()
        pq.write_table(table, buf, compression=kwargs.pop("compression", "zstd"), **kwargs)
        self.put_bytes(key, buf.getvalue(), "application/vnd.apache.parquet")

    def read_parquet(self, key: str, columns: list[str] | None = None) -> pa.Table:
        """Read one Parquet object, or every ``*.parquet`` under a prefix ending in '/'."""
        fs, base = self.arrow_fs()
        path = posixpath.join(base, _check_key(key)) if base else _check_key(key)
        try:
            if key.endswith("/"):
                dataset = pq.ParquetDataset(path.rstrip("/"), filesystem=fs)
                return dataset.read(columns=columns)
            return pq.read_table(path, filesystem=fs, columns=columns)
        except FileNotFoundError as exc:
            raise ObjectNotFound(f"{self.url_for(key)} does not exist") from exc
        except OSError as exc:  # pyarrow's S3 errors: retried like boto3's StorageErrors
            raise StorageError(f"cannot read {self.url_for(key)}: {exc}") from exc

    def url_for(self, key: str) -> str:  # pragma: no cover - overridden
        raise NotImplementedError


class LocalStorage(_ParquetMixin):
    """A directory whose relative paths are the object keys."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.uri = f"file://{self.root}"

    def _path(self, key: str) -> Path:
        return self.root / _check_key(key)

    def url_for(self, key: str) -> str:
        return f"file://{self._path(key)}"

    def get_bytes(self, key: str, max_bytes: int | None = None) -> bytes:
        """The object's bytes; ``max_bytes`` refuses a bigger one before reading it."""
        path = self._path(key)
        try:
            with open(path, "rb") as fh:
                if max_bytes is not None:
                    size = os.fstat(fh.fileno()).st_size
                    if size > max_bytes:
                        raise ObjectTooLarge(self.url_for(key), size, max_bytes)
                return fh.read()
        except OSError as exc:
            raise _local_error(exc, self.url_for(key)) from exc

    @contextmanager
    def _temp_beside(self, key: str) -> Iterator[tuple[Path, str]]:
        """A temp file next to ``key``'s path, removed unless published. Readable by the
        others the umask allows (mkstemp's 0600 would hide objects from a worker running
        as another user), and write errors are StorageErrors, retried like S3's."""
        path = self._path(key)
        url = self.url_for(key)
        tmp: str | None = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
            os.close(fd)
            os.chmod(tmp, 0o666 & ~_UMASK)
            yield path, tmp
        except OSError as exc:
            raise StorageError(f"cannot write {url}: {exc}") from exc
        finally:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)

    def put_file(self, key: str, local: Path, content_type: str | None = None) -> None:
        """Copy a finished local file next to the target, then rename (atomic publish).
        A missing or unreadable ``local`` is the caller's OSError, not a StorageError."""
        with open(local, "rb") as src, self._temp_beside(key) as (path, tmp):
            with open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
                dst.flush()
                os.fsync(dst.fileno())
            os.replace(tmp, path)
            _fsync_dir(path.parent)

    def put_bytes(self, key: str, data: bytes, content_type: str | None = None) -> None:
        with self._temp_beside(key) as (path, tmp):
            _write_synced(tmp, data)
            os.replace(tmp, path)  # atomic publish
            _fsync_dir(path.parent)

    def put_if_absent(self, key: str, data: bytes, content_type: str | None = None) -> bool:
        with self._temp_beside(key) as (path, tmp):
            _write_synced(tmp, data)
            try:
                os.link(tmp, path)  # fails if the target exists: an atomic conditional create
            except FileExistsError:
                return False
            _fsync_dir(path.parent)
            return True

    def put_if_match(
        self, key: str, data: bytes, etag: str | None, content_type: str | None = None
    ) -> bool:
        """Compare-and-swap: replace ``key`` only while its ETag is ``etag`` (None: only
        while it does not exist). A lock file serialises the writers that use this."""
        import fcntl

        if etag is None:
            return self.put_if_absent(key, data)
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.parent / f".tmp-lock-{path.name}", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                current = self.head(key).etag
            except ObjectNotFound:
                return False
            if current != etag:
                return False
            self.put_bytes(key, data)
            return True

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def head(self, key: str) -> ObjectInfo:
        path = self._path(key)
        try:
            st = path.stat()
            if not path.is_file():
                raise IsADirectoryError(errno.EISDIR, "is a directory", str(path))
            etag = _local_etag(path, st)
        except OSError as exc:
            raise _local_error(exc, self.url_for(key)) from exc
        return ObjectInfo(key, st.st_size, etag, datetime.fromtimestamp(st.st_mtime, UTC))

    def _walk(self, prefix: str) -> builtins.list[tuple[str, Path]]:
        """(key, path) of the files under ``prefix``, in lexicographic key order."""
        base = self.root / prefix if prefix else self.root
        start = base if base.is_dir() else base.parent
        if not start.exists():
            return []
        found: list[tuple[str, Path]] = []
        for dirpath, _dirnames, filenames in os.walk(start):
            for name in filenames:
                if name.startswith(".tmp-"):
                    continue
                full = Path(dirpath) / name
                key = full.relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    found.append((key, full))
        return sorted(found)

    def list_keys(self, prefix: str) -> Iterator[str]:
        """The keys ``list`` yields, without the stat and MD5 an ETag costs locally."""
        return (key for key, _ in self._walk(prefix))

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        """Objects under ``prefix`` in lexicographic key order, like S3's ListObjectsV2."""
        for key, full in self._walk(prefix):
            try:
                st = full.stat()
            except FileNotFoundError:  # deleted since the walk
                continue
            try:
                etag = _local_etag(full, st)
            except FileNotFoundError:
                continue
            except PermissionError:  # listed (as S3 lists it); reading it says why it fails
                etag = f"unreadable-{st.st_size:x}-{st.st_mtime_ns:x}-{st.st_ino:x}"
            yield ObjectInfo(key, st.st_size, etag, datetime.fromtimestamp(st.st_mtime, UTC))

    def copy(self, src: str, dst: str) -> None:
        self.put_bytes(dst, self.get_bytes(src))

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def arrow_fs(self) -> tuple[pafs.FileSystem, str]:
        return pafs.LocalFileSystem(), str(self.root)


def _read_umask() -> int:
    """The process umask: from /proc where it can be read without changing it (``os.umask``
    sets it, process-wide, for a moment; done once, at import)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def _write_synced(path: str, data: bytes) -> None:
    """Write and fsync a temp file before it is published: after a power cut a published
    name never points at empty or partial content (a reader trusts a manifest's shards)."""
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    """Make a rename or link in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# Up to this size a local ETag is the content's MD5, as S3's is for a single-part upload:
# an edit is seen even when it keeps the size and mtime (cp -p, rsync -t), and re-writing
# the same bytes is no change. Bigger files fall back to size, mtime and inode.
LOCAL_ETAG_HASH_LIMIT = 16 * 1024 * 1024


def _local_etag(path: Path, st: os.stat_result) -> str:
    if st.st_size > LOCAL_ETAG_HASH_LIMIT:
        return f"{st.st_size:x}-{st.st_mtime_ns:x}-{st.st_ino:x}"
    # ctime changes on every write and cannot be set back (unlike mtime), so this stat
    # identity names one content; a file changed in the last second is hashed every time,
    # so two writes within one timestamp tick cannot share a cached answer
    identity = (str(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if time.time_ns() - st.st_ctime_ns < 1_000_000_000:
        return _md5_file(path)
    return _cached_md5(*identity)


def _md5_file(path: Path | str) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


@functools.lru_cache(maxsize=4096)
def _cached_md5(path: str, *_stat_identity: int) -> str:
    """MD5 of a file version named by its stat identity (repeat listings cost a stat)."""
    return _md5_file(path)


def _local_error(exc: OSError, url: str) -> StorageError:
    """A missing file, or a path that cannot name one (through a file, a name too long),
    is ObjectNotFound, as the same key would be on S3; anything else is a StorageError."""
    missing = (errno.ENOENT, errno.EISDIR, errno.ENOTDIR, errno.ENAMETOOLONG)
    if exc.errno in missing:
        return ObjectNotFound(f"{url} does not exist")
    if exc.errno == errno.EACCES:  # this file's permissions; the others may be readable
        return ObjectUnreadable(f"cannot read {url}: {exc}")
    return StorageError(f"cannot read {url}: {exc}")


def _content_type(content_type: str | None) -> dict[str, str]:
    return {"ContentType": content_type} if content_type else {}


def _range_total(content_range: str | None, length: int) -> int:
    """Total object size from a ``bytes 0-N/TOTAL`` Content-Range (no header: whole body)."""
    if content_range and "/" in content_range:
        total = content_range.rsplit("/", 1)[1]
        if total.isdigit():
            return int(total)
    return int(length)


class S3Storage(_ParquetMixin):
    """A bucket (and optional key prefix) reached through boto3 and pyarrow.fs."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str = "us-east-1",
        client: Any = None,
    ):
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint_url = endpoint_url
        self.region = region
        self.uri = f"s3://{bucket}/{self.prefix}".rstrip("/")
        self.client = client or boto3.client(
            "s3",
            endpoint_url=endpoint_url,
            region_name=region,
            config=Config(
                retries={"max_attempts": 3, "mode": "standard"},
                connect_timeout=5,
                read_timeout=60,
                max_pool_connections=32,
            ),
        )

    def _key(self, key: str) -> str:
        _check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _unkey(self, full: str) -> str:
        return full[len(self.prefix) + 1 :] if self.prefix else full

    def url_for(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    def _wrap(self, exc: Exception, key: str) -> StorageError:
        from botocore.exceptions import ClientError, EndpointConnectionError

        if isinstance(exc, ClientError):
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchKey", "404", "NotFound"):
                return ObjectNotFound(f"{self.url_for(key)} does not exist")
            if code in _PER_OBJECT_CODES:
                return ObjectUnreadable(f"S3 error {code} on {self.url_for(key)}: {exc}")
            return StorageError(f"S3 error {code} on {self.url_for(key)}: {exc}")
        if isinstance(exc, EndpointConnectionError):
            return StorageError(
                f"cannot reach S3 endpoint {self.endpoint_url or 'AWS'} for {self.url_for(key)}"
            )
        return StorageError(f"S3 failure on {self.url_for(key)} via {self.endpoint_url}: {exc}")

    def get_bytes(self, key: str, max_bytes: int | None = None) -> bytes:
        """The object's bytes; with ``max_bytes`` only that many (+1) are ever transferred:
        a ranged GET, so an oversized object is refused without downloading it."""
        from botocore.exceptions import ClientError

        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": self._key(key)}
        if max_bytes is not None:
            kwargs["Range"] = f"bytes=0-{max_bytes}"
        try:
            r = self.client.get_object(**kwargs)
            if max_bytes is not None:
                total = _range_total(r.get("ContentRange"), r.get("ContentLength", 0))
                if total > max_bytes:
                    r["Body"].close()
                    raise ObjectTooLarge(self.url_for(key), total, max_bytes)
            return r["Body"].read()
        except ObjectTooLarge:
            raise
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if max_bytes is not None and code == "InvalidRange":  # an empty object
                return b""
            raise self._wrap(exc, key) from exc
        except Exception as exc:
            raise self._wrap(exc, key) from exc

    def put_file(self, key: str, local: Path, content_type: str | None = None) -> None:
        """boto3's managed upload (multipart for big files): the object only appears when
        the upload completes, so there is never a partial object under ``key``."""
        extra = _content_type(content_type)
        try:
            self.client.upload_file(str(local), self.bucket, self._key(key), ExtraArgs=extra)
        except Exception as exc:
            raise self._wrap(exc, key) from exc

    def put_bytes(self, key: str, data: bytes, content_type: str | None = None) -> None:
        extra = _content_type(content_type)
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, **extra)
        except Exception as exc:
            raise self._wrap(exc, key) from exc

    def put_if_absent(self, key: str, data: bytes, content_type: str | None = None) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.put_object(
                Bucket=self.bucket,
                Key=self._key(key),
                Body=data,
                IfNoneMatch="*",
                **_content_type(content_type),
            )
            return True
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("PreconditionFailed", "ConditionalRequestConflict", "412"):
                return self._holds(key, data)
            raise self._wrap(exc, key) from exc
        except Exception as exc:
            raise self._wrap(exc, key) from exc

    def _holds(self, key: str, data: bytes) -> bool:
        """After a failed condition: whether ``key`` holds exactly ``data``. When the
        response to a conditional write is lost, botocore resends it and the resend fails
        the condition against our own landed write; the bytes tell. Callers write bodies
        unique to the writer (a timestamp, a token), or identical content (a pair list
        dropped twice), for which two "winners" lose nothing."""
        try:
            return self.get_bytes(key, max_bytes=len(data)) == data
        except StorageError:  # gone, bigger than ours, unreadable: not our write
            return False

    def put_if_match(
        self, key: str, data: bytes, etag: str | None, content_type: str | None = None
    ) -> bool:
        """Compare-and-swap via S3's conditional write (``If-Match``); None: only while
        ``key`` does not exist. False when another writer got there first."""
        from botocore.exceptions import ClientError

        if etag is None:
            return self.put_if_absent(key, data, content_type)
        try:
            self.client.put_object(
                Bucket=self.bucket,
                Key=self._key(key),
                Body=data,
                IfMatch=f'"{etag}"',
                **_content_type(content_type),
            )
            return True
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("PreconditionFailed", "ConditionalRequestConflict", "412", "NoSuchKey"):
                return self._holds(key, data)
            raise self._wrap(exc, key) from exc
        except Exception as exc:
            raise self._wrap(exc, key) from exc

    def head(self, key: str) -> ObjectInfo:
        try:
            r = self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except Exception as exc:
            raise self._wrap(exc, key) from exc
        return ObjectInfo(key, r["ContentLength"], r["ETag"].strip('"'), r["LastModified"])

    def exists(self, key: str) -> bool:
        try:
            self.head(key)
            return True
        except ObjectNotFound:
            return False

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        paginator = self.client.get_paginator("list_objects_v2")
        full_prefix = self._key(prefix) if prefix else (f"{self.prefix}/" if self.prefix else "")
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=full_prefix):
                for obj in page.get("Contents", []):
                    if obj["Key"].endswith("/"):
                        continue  # "directory" markers
                    yield ObjectInfo(
                        self._unkey(obj["Key"]),
                        obj["Size"],
                        obj["ETag"].strip('"'),
                        obj["LastModified"],
                    )
        except Exception as exc:
            raise self._wrap(exc, prefix) from exc

    def list_keys(self, prefix: str) -> Iterator[str]:
        return (info.key for info in self.list(prefix))

    def copy(self, src: str, dst: str) -> None:
        try:
            self.client.copy_object(
                Bucket=self.bucket,
                Key=self._key(dst),
                CopySource={"Bucket": self.bucket, "Key": self._key(src)},
            )
        except Exception as exc:
            raise self._wrap(exc, src) from exc

    def delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))
        except Exception as exc:
            raise self._wrap(exc, key) from exc

    def arrow_fs(self) -> tuple[pafs.FileSystem, str]:
        kwargs: dict[str, Any] = {"region": self.region}
        if self.endpoint_url:
            parsed = urlparse(self.endpoint_url)
            kwargs["endpoint_override"] = parsed.netloc
            kwargs["scheme"] = parsed.scheme or "http"
        creds = self.client._request_signer._credentials  # same credentials as boto3
        if creds is not None:
            frozen = creds.get_frozen_credentials()
            kwargs.update(
                access_key=frozen.access_key,
                secret_key=frozen.secret_key,
                session_token=frozen.token,
            )
        base = f"{self.bucket}/{self.prefix}".rstrip("/")
        return pafs.S3FileSystem(**kwargs), base


def storage_from_uri(
    uri: str, *, endpoint_url: str | None = None, region: str = "us-east-1"
) -> LocalStorage | S3Storage:
    """Build a storage from ``file://...`` or ``s3://bucket/prefix``."""
    if uri.startswith("file://"):
        path = uri[len("file://") :]
        return LocalStorage(path or ".")
    if uri.startswith("s3://"):
        parsed = urlparse(uri)
        if not parsed.netloc:
            raise ValueError(f"S3 storage URI needs a bucket: {uri!r}")
        return S3Storage(
            parsed.netloc, parsed.path.lstrip("/"), endpoint_url=endpoint_url, region=region
        )
    raise ValueError(f"unsupported storage URI {uri!r} (use file:// or s3://)")


def get_storage(settings: Any = None) -> LocalStorage | S3Storage:
    """The storage named by the settings (built fresh: no global client)."""
    if settings is None:
        from core.settings import get_settings

        settings = get_settings()
    return storage_from_uri(
        settings.storage_uri, endpoint_url=settings.s3_endpoint_url, region=settings.aws_region
    )
