"""One read / write / list API for local paths and ``s3://bucket/key`` URIs.

S3 goes through the ``minio`` SDK. Endpoint and credentials come from ``StoreSettings``
(the experiment config) or the standard variables ``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY`` and ``AWS_REGION``.

Every write is atomic: a local write goes to a temporary file in the same folder and is
renamed into place; an S3 PUT (single or multipart) becomes visible only when complete.
Multi-file artifacts (face shards) commit with a manifest written last (see contracts.py).
"""

from __future__ import annotations

import contextlib
import io
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from pydantic import BaseModel, ConfigDict, SecretStr

from d2mtl.errors import UserError

# minio:// is KFP's name for its own artifact store (a publish prefix there: docs/pipeline.md); both speak S3
S3_SCHEMES = ("s3://", "minio://")


class StoreError(UserError):
    """A storage problem explained in one line (never carries a secret)."""


class StoreSettings(BaseModel):
    """Object-store connection; unset fields fall back to the AWS_* environment variables."""

    model_config = ConfigDict(extra="forbid")

    endpoint: str | None = None  # e.g. http://minio.kubeflow:9000
    access_key: str | None = None
    secret_key: SecretStr | None = None
    region: str | None = None
    retries: int = 4  # attempts beyond the first for connection errors
    backoff_s: float = 0.5  # first retry delay; doubles each time
    connect_timeout_s: float = 10.0  # per attempt: an endpoint that drops packets fails this fast
    read_timeout_s: float = 300.0  # per request: a stalled transfer counts as a connection error


def is_remote(uri: str) -> bool:
    return uri.startswith(S3_SCHEMES)


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a local path or an S3 URI."""
    if is_remote(uri):
        return "/".join([uri.rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(uri, *parts))


def split_s3(uri: str) -> tuple[str, str]:
    parsed = urlparse(uri)
    if not parsed.netloc:
        raise StoreError(f"{uri!r} has no bucket; expected s3://bucket/key")
    return parsed.netloc, parsed.path.lstrip("/")


@dataclass
class _S3:
    settings: StoreSettings

    def __post_init__(self) -> None:
        from minio import Minio

        endpoint = self.settings.endpoint or os.environ.get("AWS_ENDPOINT_URL")
        if not endpoint:
            raise StoreError("no S3 endpoint: set AWS_ENDPOINT_URL (e.g. http://localhost:9000) or store.endpoint")
        parsed = urlparse(endpoint if "://" in endpoint else f"http://{endpoint}")
        secret = self.settings.secret_key.get_secret_value() if self.settings.secret_key else None
        self.endpoint = parsed.netloc
        self.client = Minio(
            parsed.netloc,
            access_key=self.settings.access_key or os.environ.get("AWS_ACCESS_KEY_ID"),
            secret_key=secret or os.environ.get("AWS_SECRET_ACCESS_KEY"),
            region=self.settings.region or os.environ.get("AWS_REGION") or "us-east-1",
            secure=parsed.scheme == "https",
            http_client=self._http_client(),
        )

    def _http_client(self):
        """minio's default pool, but with our timeouts and no connection retries of its own: ``call``
        retries them with its bounded backoff (two retry layers multiplied to minutes)."""
        import certifi
        import urllib3

        return urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=self.settings.connect_timeout_s, read=self.settings.read_timeout_s),
            maxsize=10,
            cert_reqs="CERT_REQUIRED",
            ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where(),
            retries=urllib3.Retry(
                total=3, connect=0, read=0, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]
            ),
        )

    def call(self, what: str, uri: str, fn, *args, **kwargs):
        """Run a minio call with bounded retries on connection errors and one-line errors."""
        from minio.error import S3Error
        from urllib3.exceptions import HTTPError as Urllib3Error

        delay = self.settings.backoff_s
        for attempt in range(self.settings.retries + 1):
            try:
                return fn(*args, **kwargs)
            except S3Error as err:
                if err.code in ("NoSuchKey", "NoSuchBucket", "NoSuchObject"):
                    raise FileNotFoundError(uri) from None
                if err.code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                    raise StoreError(
                        f"{what} {uri}: access denied by {self.endpoint} ({err.code}); "
                        "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY"
                    ) from None
                raise StoreError(f"{what} {uri}: {err.code}: {err.message}") from None
            except (Urllib3Error, ConnectionError, OSError) as err:
                if attempt == self.settings.retries:
                    raise StoreError(
                        f"{what} {uri}: object store {self.endpoint} unreachable after "
                        f"{attempt + 1} attempts ({type(err).__name__})"
                    ) from None
                time.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")


_clients: dict[str, _S3] = {}
_settings = StoreSettings()


def configure(settings: StoreSettings) -> None:
    """Use these connection settings for every later S3 call."""
    global _settings
    _settings = settings
    _clients.clear()


def _s3() -> _S3:
    key = _settings.model_dump_json() + os.environ.get("AWS_ENDPOINT_URL", "")
    if key not in _clients:
        _clients[key] = _S3(_settings)
    return _clients[key]


def _file_in_the_way(path: Path) -> Path | None:
    """The first of ``path``'s parents that is a file, not a folder (None when there is none)."""
    return next((parent for parent in reversed(path.parents) if parent.is_file()), None)


def check_folder(uri: str, what: str) -> None:
    """Refuse a local folder to read or write (``what``, e.g. ``--out``) that is a file or lies below one."""
    if is_remote(uri):
        return
    blocker = Path(uri) if Path(uri).is_file() else _file_in_the_way(Path(uri))
    if blocker is not None:
        raise StoreError(f"{what} {uri}: {blocker} is a file; expected a folder")


def read_bytes(uri: str) -> bytes:
    if not is_remote(uri):
        try:
            return Path(uri).read_bytes()
        except IsADirectoryError:
            raise StoreError(f"{uri} is a folder, expected a file") from None
        except NotADirectoryError:
            raise StoreError(f"cannot read {uri}: {_file_in_the_way(Path(uri))} is a file, not a folder") from None
    s3 = _s3()
    bucket, key = split_s3(uri)

    def get() -> bytes:
        s3.client.stat_object(bucket, key)  # rclone's error bodies make a missing key safest found by stat
        response = s3.client.get_object(bucket, key)
        try:
            return response.read()
        finally:
            response.close()
            response.release_conn()

    return s3.call("read", uri, get)


def write_bytes(uri: str, data: bytes, content_type: str = "application/octet-stream") -> None:
    """Write a whole object atomically."""
    if not is_remote(uri):
        path = Path(uri)
        _make_parent(path)
        if path.is_dir():
            raise StoreError(f"cannot write {uri}: it is a folder")
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        # os.open, not mkstemp (mode 0600): the file gets the usual mode, 0666 less the process's umask
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        return
    s3 = _s3()
    bucket, key = split_s3(uri)
    s3.call("write", uri, _ensure_bucket, s3.client, bucket)
    # a fresh stream per attempt: a retry after a failed upload must send the bytes from the start
    s3.call(
        "write", uri, lambda: s3.client.put_object(bucket, key, io.BytesIO(data), len(data), content_type=content_type)
    )


def _make_parent(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise StoreError(f"cannot write {path}: {_file_in_the_way(path)} is a file, not a folder") from None


def _ensure_bucket(client, bucket: str) -> None:
    from minio.error import S3Error

    if client.bucket_exists(bucket):
        return
    try:
        client.make_bucket(bucket)
    except S3Error as err:  # a parallel writer (another shard pod) created it first
        if err.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
            raise


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode(), content_type="text/plain; charset=utf-8")


def read_text(uri: str) -> str:
    return read_bytes(uri).decode()


def exists(uri: str) -> bool:
    if not is_remote(uri):
        return Path(uri).exists()
    s3 = _s3()
    bucket, key = split_s3(uri)

    def stat() -> bool:
        from minio.error import S3Error

        try:
            s3.client.stat_object(bucket, key)
            return True
        except S3Error as err:
            if err.code in ("NoSuchKey", "NoSuchBucket", "NoSuchObject", "ResourceNotFound"):
                return False
            raise

    return s3.call("stat", uri, stat)


def list_files(uri: str) -> list[str]:
    """All files below a folder / prefix, recursively, sorted, as full URIs."""
    if not is_remote(uri):
        root = Path(uri)
        if not root.exists():
            return []
        if root.is_file():
            return [str(root)]
        return sorted(str(p) for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
    s3 = _s3()
    bucket, prefix = split_s3(uri)
    prefix = prefix.rstrip("/") + "/" if prefix else ""
    scheme = uri.split("://", 1)[0]

    def listing() -> list[str]:
        if not s3.client.bucket_exists(bucket):
            return []
        return sorted(
            f"{scheme}://{bucket}/{o.object_name}"
            for o in s3.client.list_objects(bucket, prefix, recursive=True)
            if not o.is_dir
        )

    return s3.call("list", uri, listing)


def delete(uri: str) -> None:
    """Delete a file or everything below a folder / prefix (missing is fine)."""
    if not is_remote(uri):
        path = Path(uri)
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        return
    s3 = _s3()
    for item in list_files(uri) or [uri]:
        bucket, key = split_s3(item)
        s3.call("delete", item, s3.client.remove_object, bucket, key)


def upload_file(local: str | Path, uri: str) -> None:
    """Copy a local file to ``uri`` atomically (streamed for S3)."""
    if not is_remote(uri):
        _make_parent(Path(uri))
        tmp = Path(uri).with_name(f".{Path(uri).name}.tmp")
        shutil.copyfile(local, tmp)
        os.replace(tmp, uri)
        return
    s3 = _s3()
    bucket, key = split_s3(uri)
    s3.call("write", uri, _ensure_bucket, s3.client, bucket)
    s3.call("upload", uri, s3.client.fput_object, bucket, key, str(local))


@contextlib.contextmanager
def local_path(uri: str, suffix: str = "") -> Iterator[Path]:
    """A local file holding ``uri``'s bytes: the path itself when local, else a temporary download."""
    if not is_remote(uri):
        if not Path(uri).exists():
            raise FileNotFoundError(uri)
        yield Path(uri)
        return
    with tempfile.TemporaryDirectory(prefix="d2mtl-") as tmp:
        path = Path(tmp, "object" + suffix)
        s3 = _s3()
        bucket, key = split_s3(uri)
        s3.call("stat", uri, s3.client.stat_object, bucket, key)
        s3.call("download", uri, s3.client.fget_object, bucket, key, str(path))
        yield path
