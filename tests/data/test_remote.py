"""`aligntok.data.remote`: HTTP(S) and S3 objects as streams and as cached local copies, against real servers
on 127.0.0.1 (a static file server, and a minimal S3-compatible one that boto3 talks to over HTTP)."""

from __future__ import annotations

import functools
import hashlib
import http.server
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest

from aligntok.data.remote import RemoteError, cache_root, fetch_to_cache, open_stream, s3_client, split_s3_url

from support.servers import serve_http

PAYLOAD = bytes(range(256)) * 4099  # ~1 MiB and not a multiple of the read chunk


class _Counting(http.server.SimpleHTTPRequestHandler):
    """Serves its folder; counts every request; `/short.bin` announces more bytes than it sends."""

    requests: list[str]

    def do_GET(self) -> None:
        self.requests.append(self.path)
        if self.path == "/short.bin":
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b"x" * 10)
            self.close_connection = True
            return
        super().do_GET()

    def do_HEAD(self) -> None:
        self.requests.append(f"HEAD {self.path}")
        super().do_HEAD()

    def log_message(self, *args: object) -> None:
        pass


class _ObjectStore(http.server.BaseHTTPRequestHandler):
    """Path-style S3 GetObject: `/<bucket>/<key>` from `objects`, S3's XML error (NoSuchKey) otherwise."""

    objects: dict[str, bytes]
    requests: list[tuple[str, str]]

    def do_GET(self) -> None:
        path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
        self.requests.append((path, self.headers.get("Authorization", "")))
        body = self.objects.get(path)
        if body is None:
            error = b"<Error><Code>NoSuchKey</Code><Message>The specified key does not exist.</Message></Error>"
            self.send_response(404)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(error)))
            self.end_headers()
            self.wfile.write(error)
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def http_files(tmp_path: Path) -> Iterator[tuple[str, list[str]]]:
    """(base URL, the request log) of a server of a folder holding `shards/train-000000.tar` = PAYLOAD."""
    root = tmp_path / "served"
    (root / "shards").mkdir(parents=True)
    (root / "shards" / "train-000000.tar").write_bytes(PAYLOAD)
    requests: list[str] = []
    handler = type("Handler", (_Counting,), {"requests": requests})
    for url in serve_http(functools.partial(handler, directory=str(root))):  # type: ignore[arg-type]
        yield url, requests


@pytest.fixture
def s3_store(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[tuple[dict[str, bytes], list]]:
    """A fake S3 endpoint in `ALIGNTOK_DATA_S3_ENDPOINT_URL`, with throwaway credentials and no AWS files."""
    objects: dict[str, bytes] = {}
    requests: list[tuple[str, str]] = []
    handler = type("Store", (_ObjectStore,), {"objects": objects, "requests": requests})
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "data-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "data-secret")
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", "http://127.0.0.1:1")  # the artifact store's: must not be used
    for url in serve_http(handler):
        monkeypatch.setenv("ALIGNTOK_DATA_S3_ENDPOINT_URL", url)
        yield objects, requests


# --- HTTP ---------------------------------------------------------------------------------------


def test_fetch_to_cache_downloads_once_into_the_url_keyed_folder(http_files, tmp_path: Path) -> None:
    base, requests = http_files
    url = f"{base}/shards/train-000000.tar"
    cache = tmp_path / "cache"
    first = fetch_to_cache(url, cache)
    assert first == cache / hashlib.sha256(url.encode()).hexdigest()[:16] / "train-000000.tar"
    assert first.read_bytes() == PAYLOAD
    assert requests == ["/shards/train-000000.tar"]
    assert fetch_to_cache(url, cache) == first  # served from the cache: the server sees nothing
    assert requests == ["/shards/train-000000.tar"]
    assert sorted(p.name for p in first.parent.iterdir()) == ["train-000000.tar"]  # no temporary left


def test_a_missing_object_is_one_line_naming_the_url_and_caches_nothing(http_files, tmp_path: Path) -> None:
    base, _ = http_files
    url = f"{base}/shards/train-000099.tar"
    with pytest.raises(RemoteError) as caught:
        fetch_to_cache(url, tmp_path / "cache")
    message = str(caught.value)
    assert message.startswith(f"{url}: HTTP 404") and "\n" not in message
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    with pytest.raises(RemoteError, match=r"train-000099\.tar: HTTP 404"):
        open_stream(url)


def test_a_body_shorter_than_announced_is_an_error_and_never_cached(http_files, tmp_path: Path) -> None:
    base, _ = http_files
    url = f"{base}/short.bin"
    cut = rf"^{url}: received 10 bytes, the server announced 1000$"
    with pytest.raises(RemoteError, match=cut):
        fetch_to_cache(url, tmp_path / "cache")
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]  # neither the copy nor a temporary
    with pytest.raises(RemoteError, match=cut), open_stream(url) as stream:  # a stream, too, ends in an error
        stream.read()


def test_open_stream_reads_http_local_and_file_urls(http_files, tmp_path: Path) -> None:
    base, _ = http_files
    with open_stream(f"{base}/shards/train-000000.tar") as stream:
        assert stream.read(10) == PAYLOAD[:10]
        assert stream.read() == PAYLOAD[10:]
    local = tmp_path / "served" / "shards" / "train-000000.tar"
    for url in (str(local), f"file://{local}"):
        with open_stream(url) as stream:
            assert stream.read() == PAYLOAD
        assert fetch_to_cache(url, tmp_path / "cache") == local  # a local file is used in place
    with pytest.raises(RemoteError, match="cannot open"):
        open_stream(str(tmp_path / "absent.tar"))
    with pytest.raises(RemoteError, match=r"unsupported URL scheme 'ftp:'"):
        open_stream("ftp://example.org/a.tar")


def test_an_unreachable_server_is_one_line_naming_the_url(tmp_path: Path) -> None:
    url = "http://127.0.0.1:1/shards/train-000000.tar"  # port 1: nothing listens
    with pytest.raises(RemoteError, match=rf"^{url}: cannot connect") as caught:
        open_stream(url)
    assert "\n" not in str(caught.value)


def test_cache_root_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("ALIGNTOK_SHARD_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_root() == tmp_path / ".cache" / "aligntok" / "shards"
    monkeypatch.setenv("ALIGNTOK_SHARD_CACHE", str(tmp_path / "scratch"))
    assert cache_root() == tmp_path / "scratch"
    assert not (tmp_path / "scratch").exists()  # naming the folder creates nothing


# --- S3 -----------------------------------------------------------------------------------------


def test_the_s3_client_takes_the_data_endpoint_not_mlflows(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", "http://mlflow-artifacts:9000")
    monkeypatch.setenv("ALIGNTOK_DATA_S3_ENDPOINT_URL", "http://datasets.internal:9000")
    client = s3_client()
    assert client.meta.endpoint_url == "http://datasets.internal:9000"
    assert client.meta.config.s3["addressing_style"] == "path"  # what MinIO/Ceph behind a host name expect
    assert s3_client("http://other:1").meta.endpoint_url == "http://other:1"
    monkeypatch.delenv("ALIGNTOK_DATA_S3_ENDPOINT_URL")
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    assert "mlflow-artifacts" not in s3_client().meta.endpoint_url  # unset: boto3's own endpoint, never MLflow's


def test_s3_objects_stream_and_cache_through_the_data_endpoint(s3_store, tmp_path: Path) -> None:
    objects, requests = s3_store
    objects["/datasets/imagenet/train-000000.tar"] = PAYLOAD
    url = "s3://datasets/imagenet/train-000000.tar"
    with open_stream(url) as stream:
        assert stream.read() == PAYLOAD
    assert [path for path, _ in requests] == ["/datasets/imagenet/train-000000.tar"]  # path-style, this endpoint
    assert "Credential=data-key/" in requests[0][1]  # signed with the standard chain's credentials
    cached = fetch_to_cache(url, tmp_path / "cache")
    assert cached.name == "train-000000.tar" and cached.read_bytes() == PAYLOAD
    assert fetch_to_cache(url, tmp_path / "cache") == cached
    assert len(requests) == 2  # one stream, one download; the second fetch came from the cache


def test_s3_errors_are_one_line_naming_the_url(s3_store, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    url = "s3://datasets/imagenet/missing.tar"
    with pytest.raises(RemoteError) as caught:
        fetch_to_cache(url, tmp_path / "cache")
    assert str(caught.value).startswith(f"{url}: S3 error NoSuchKey") and "\n" not in str(caught.value)
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(RemoteError, match=r"^s3://datasets/imagenet/missing\.tar: Unable to locate credentials$"):
        open_stream(url)
    with pytest.raises(RemoteError, match="not an s3://BUCKET/KEY URL"):
        open_stream("s3://bucket-only")


def test_s3_keys_are_taken_literally() -> None:
    assert split_s3_url("s3://bucket/a b/c;touch x?y#z%41.tar") == ("bucket", "a b/c;touch x?y#z%41.tar")
