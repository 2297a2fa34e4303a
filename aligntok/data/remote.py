"""Remote files as streams and as local copies: `https://`, `http://` and `s3://` URLs, local paths too.

- `open_stream(url)`: a binary stream of the whole object, read as it arrives (nothing is held in memory
  or written to disk). HTTP(S) goes through urllib; `s3://BUCKET/KEY` through boto3 (`get_object`'s
  streamed `Body`), never through a shell or the AWS CLI. A local path or `file://` URL opens the file.
- `fetch_to_cache(url, cache_dir)`: the object downloaded once into `cache_dir/<sha256(url)[:16]>/<name>`
  (written to a temporary file beside it, then renamed, so a crash never leaves a partial copy under the
  final name). A copy already there is returned without contacting the server: a copy is only ever
  renamed into place after its byte count matched the server's Content-Length (S3's ContentLength), so it
  is complete. The cache therefore assumes that the object under a URL does not change; a dataset
  re-ingested to the same URL needs a fresh `cache_dir`.
- `cache_root()`: `$ALIGNTOK_SHARD_CACHE`, default `~/.cache/aligntok/shards`.
- `object_info(url)`: what the server says identifies the object (ETag, size, Last-Modified) without sending
  it: an HTTP HEAD, or S3's `head_object` (the source fingerprint, `aligntok.data.fingerprint`).

S3 endpoint and credentials: `$ALIGNTOK_DATA_S3_ENDPOINT_URL` names the data store's endpoint (an S3-
compatible server such as MinIO or Ceph; unset: boto3's own choice, AWS itself unless
`AWS_ENDPOINT_URL_S3`/`AWS_ENDPOINT_URL` or the AWS config say otherwise). It is deliberately apart from
`MLFLOW_S3_ENDPOINT_URL`, the artifact store's. Credentials come from boto3's standard chain
(`AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`, `AWS_PROFILE`, the shared files, an instance or pod role).

Every failure (not found, refused, no credentials, a connection cut mid-object, a short body) is a
`RemoteError` of one line naming the URL, also when it happens while the stream is being read.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any, BinaryIO

from aligntok.errors import AligntokError, one_line

__all__ = ["DATA_S3_ENDPOINT_ENV", "SHARD_CACHE_ENV", "RemoteError", "cache_root", "fetch_to_cache", "object_info",
           "open_stream", "s3_client", "split_s3_url"]

DATA_S3_ENDPOINT_ENV = "ALIGNTOK_DATA_S3_ENDPOINT_URL"
"""The environment variable naming the S3 endpoint that data (input shards, shard locations) is read from."""
SHARD_CACHE_ENV = "ALIGNTOK_SHARD_CACHE"
"""The environment variable naming the local folder that remote shards are cached in."""
DEFAULT_CACHE = Path("~/.cache/aligntok/shards")
HTTP_TIMEOUT_S = 60
_CHUNK = 1 << 20
_URL_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")


class RemoteError(AligntokError, OSError):
    """A remote (or local) object that cannot be opened or read; the message names its URL."""


def cache_root() -> Path:
    """The shard cache folder: `$ALIGNTOK_SHARD_CACHE`, else `~/.cache/aligntok/shards` (not created here)."""
    configured = os.environ.get(SHARD_CACHE_ENV)
    return Path(configured).expanduser() if configured else DEFAULT_CACHE.expanduser()


def s3_client(endpoint_url: str | None = None) -> Any:
    """A boto3 S3 client for data: endpoint `endpoint_url`, else `$ALIGNTOK_DATA_S3_ENDPOINT_URL`, else boto3's
    default; credentials from boto3's standard chain. Path-style addressing when an endpoint is named, as
    S3-compatible servers reached by host name or IP expect."""
    import boto3
    from botocore.config import Config

    endpoint = endpoint_url or os.environ.get(DATA_S3_ENDPOINT_ENV) or None
    config = Config(retries={"mode": "standard", "max_attempts": 5},
                    s3={"addressing_style": "path"} if endpoint else None)
    return boto3.session.Session().client("s3", endpoint_url=endpoint, config=config)


def open_stream(url: str) -> BinaryIO:
    """The object at `url` (`https://`, `http://`, `s3://`, `file://` or a local path) as a binary stream;
    close it (or use `with`). `RemoteError` naming the URL when it cannot be opened or read."""
    return _open(url)[0]


def fetch_to_cache(url: str, cache_dir: Path) -> Path:
    """The local copy of `url` in `cache_dir/<sha256(url)[:16]>/<basename>`, downloaded on first use (see the
    module doc). A local path or `file://` URL is returned as it is, without a copy."""
    local = local_path(url)
    if local is not None:
        if not local.is_file():
            raise RemoteError(f"{url}: file not found")
        return local
    name = _basename(url)
    target = Path(cache_dir) / hashlib.sha256(url.encode("utf-8")).hexdigest()[:16] / name
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # unique per process and thread: ranks, loader workers and threads may fetch the same file at once
    partial = target.with_name(f".{name}.{os.getpid()}.{uuid.uuid4().hex}.partial")
    try:
        stream, size = _open(url)
        with stream, open(partial, "xb") as out:
            while chunk := stream.read(_CHUNK):  # a body shorter than `size` raises here
                out.write(chunk)
            written = out.tell()
        if size is not None and written != size:  # longer than announced
            raise RemoteError(f"{url}: received {written} bytes, the server announced {size}")
        os.replace(partial, target)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        if isinstance(exc, RemoteError):
            raise
        raise RemoteError(f"{url}: cannot write the cached copy {partial} ({one_line(exc)})") from None
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return target


def _open(url: str) -> tuple[BinaryIO, int | None]:
    """(stream, size in bytes when the server or file system says it)."""
    local = local_path(url)
    if local is not None:
        try:
            stream = open(local, "rb")  # noqa: SIM115 - returned to the caller, who closes it
        except OSError as exc:
            raise RemoteError(f"{url}: cannot open ({exc.strerror or one_line(exc)})") from None
        return stream, os.fstat(stream.fileno()).st_size
    scheme = url.split(":", 1)[0].lower()  # a URL: local_path found a scheme
    if scheme == "s3":
        return _open_s3(url)
    if scheme in ("http", "https"):
        return _open_http(url)
    raise RemoteError(f"{url}: unsupported URL scheme '{scheme}:'; use https://, http://, s3:// or a local path")


def _open_http(url: str) -> tuple[BinaryIO, int | None]:
    response = _urlopen(url, "GET")
    size = _content_length(response.headers)
    return _guarded(response, url, size), size


def _urlopen(url: str, method: str) -> Any:
    """urllib's response to `method` on an http(s) URL; `RemoteError` naming the URL when it fails."""
    try:
        request = urllib.request.Request(url, method=method)
        return urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S)  # noqa: S310 - http(s) only, checked above
    except urllib.error.HTTPError as exc:
        exc.close()
        raise RemoteError(f"{url}: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        detail = reason if isinstance(reason, str) else one_line(reason)
        raise RemoteError(f"{url}: cannot connect ({detail})") from None


def _content_length(headers: Any) -> int | None:
    length = headers.get("Content-Length")
    return int(length) if length and length.isdigit() else None


def object_info(url: str, client: Any = None) -> dict[str, str | int]:
    """What the server says identifies the object at `url`, without sending it: those of `etag`, `size` and
    `last_modified` it gave. `http(s)://`: a HEAD's ETag, Content-Length and Last-Modified (a HEAD that is
    redirected becomes a GET, as urllib does, whose body is not read); `s3://`: `head_object`'s ETag and
    ContentLength, through `client` (default: `s3_client()`). `RemoteError` naming the URL when it fails."""
    scheme = url.split(":", 1)[0].lower()
    if scheme in ("http", "https"):
        with _urlopen(url, "HEAD") as response:
            info = {"etag": response.headers.get("ETag"), "size": _content_length(response.headers),
                    "last_modified": response.headers.get("Last-Modified")}
    elif scheme == "s3":
        bucket, key = split_s3_url(url)
        try:
            head = (client or s3_client()).head_object(Bucket=bucket, Key=key)
        except Exception as exc:  # botocore's ClientError, NoCredentialsError, EndpointConnectionError, ...
            raise RemoteError(f"{url}: {_s3_problem(exc)}") from None
        size = head.get("ContentLength")
        info = {"etag": head.get("ETag"), "size": int(size) if size is not None else None}
    else:
        raise RemoteError(f"{url}: not a remote URL; object_info takes https://, http:// or s3://")
    return {key: value for key, value in info.items() if value is not None}


def _open_s3(url: str) -> tuple[BinaryIO, int | None]:
    bucket, key = split_s3_url(url)
    try:
        response = s3_client().get_object(Bucket=bucket, Key=key)
    except Exception as exc:  # botocore raises ClientError, NoCredentialsError, EndpointConnectionError, ...
        raise RemoteError(f"{url}: {_s3_problem(exc)}") from None
    size = response.get("ContentLength")
    size = int(size) if size is not None else None
    return _guarded(response["Body"], url, size), size


def split_s3_url(url: str) -> tuple[str, str]:
    """(bucket, key) of `s3://BUCKET/KEY`; the key is taken literally (`;`, `?`, `#` and `%` included)."""
    bucket, _, key = url[len("s3://"):].partition("/")
    if not url.lower().startswith("s3://") or not bucket or not key:
        raise RemoteError(f"{url}: not an s3://BUCKET/KEY URL")
    return bucket, key


def _s3_problem(exc: BaseException) -> str:
    response = getattr(exc, "response", None)
    if isinstance(response, dict) and "Error" in response:
        error = response["Error"]
        code = error.get("Code", "?")
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        message = error.get("Message") or {"404": "Not Found", "NoSuchKey": "no such key",
                                           "403": "Forbidden", "AccessDenied": "access denied"}.get(code, "")
        return f"S3 error {code}" + (f" (HTTP {status})" if status else "") + (f": {message}" if message else "")
    return one_line(exc)


def _basename(url: str) -> str:
    """The file name a remote URL ends in (an S3 key's last segment, an HTTP path's, unquoted)."""
    if url.lower().startswith("s3:"):
        path = split_s3_url(url)[1]
    else:
        path = urllib.parse.unquote(urllib.parse.urlsplit(url).path)
    name = path.rstrip("/").rsplit("/", 1)[-1]
    if name in ("", ".", ".."):
        raise RemoteError(f"{url}: names no file (the URL must end in a file name)")
    return name


def local_path(url: str) -> Path | None:
    """The file that a local path or `file://` URL names; None for any other URL."""
    found = _URL_SCHEME.match(url)
    if found is None:
        return Path(url)
    if found.group(1).lower() != "file":
        return None
    parsed = urllib.parse.urlsplit(url)
    if parsed.netloc not in ("", "localhost"):
        raise RemoteError(f"{url}: file:// URL names another host ({parsed.netloc})")
    return Path(urllib.request.url2pathname(parsed.path))


def _guarded(raw: Any, url: str, size: int | None) -> BinaryIO:
    """`raw` (an HTTP response or a botocore StreamingBody) behind a buffer whose read errors are RemoteErrors."""
    return io.BufferedReader(_GuardedRaw(raw, url, size), buffer_size=_CHUNK)  # type: ignore[return-value]


class _GuardedRaw(io.RawIOBase):
    """A raw stream over `raw.read(n)` that turns any failure while reading (a connection reset, a timeout,
    a body that ends before the `size` bytes announced) into one `RemoteError` naming the URL. (urllib's
    `read(n)` reports a cut body as a quiet end of data.)"""

    def __init__(self, raw: Any, url: str, size: int | None) -> None:
        self._raw, self._url, self._size, self._seen = raw, url, size, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        try:
            data = self._raw.read(len(buffer))
        except Exception as exc:  # http.client.IncompleteRead, urllib3/botocore read errors, socket timeouts
            raise RemoteError(f"{self._url}: reading failed ({one_line(exc)})") from None
        if not data and len(buffer) and self._size is not None and self._seen != self._size:
            raise RemoteError(f"{self._url}: received {self._seen} bytes, the server announced {self._size}")
        buffer[: len(data)] = data
        self._seen += len(data)
        return len(data)

    def close(self) -> None:
        if not self.closed:
            try:
                self._raw.close()
            finally:
                super().close()
