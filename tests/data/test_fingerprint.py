"""`aligntok.data.fingerprint` and the `snapshot` stage: a source's fingerprint changes exactly when its inputs
do, is byte-identical otherwise, and makes DVC rerun what follows ingest only then."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import json
import os
import subprocess
import sys
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from aligntok.cli import main
from aligntok.config import DataConfig
from aligntok.data.fingerprint import FORMAT, fingerprint, to_json
from aligntok.data.sources import FASHION_MNIST_FILES, ImageFolder, IngestError

from support.corpus import noise_png, write_tar
from support.servers import serve_http


def _folder(root: Path, images: int = 3) -> Path:
    """An ImageNet-layout folder of `images` PNGs in two classes."""
    for i in range(images):
        path = root / ("cat" if i % 2 else "dog") / f"{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(noise_png(seed=i))
    return root


def _described(spec: str, **kw: object) -> dict:
    return fingerprint(DataConfig(source=spec, **kw))["source"]


# --- image folders --------------------------------------------------------------------------------


def test_an_unchanged_folder_gives_identical_bytes(tmp_path: Path) -> None:
    cfg = DataConfig(source=f"imagefolder:{_folder(tmp_path / 'images')}")
    first = to_json(fingerprint(cfg))
    assert to_json(fingerprint(cfg)) == first
    described = json.loads(first)
    assert described["format"] == FORMAT and described["val_source"] is None
    source = described["source"]
    assert (source["kind"], source["file_count"]) == ("imagefolder", 3)
    assert source["total_bytes"] == sum(p.stat().st_size for p in (tmp_path / "images").rglob("*.png"))
    assert set(source) == {"spec", "kind", "file_count", "total_bytes", "digest"}  # no per-file listing
    assert first == json.dumps(described, indent=2, sort_keys=True) + "\n"  # sorted keys, so a stable text


@pytest.mark.parametrize("change", ["add an image", "grow a file", "touch a file", "rename a file"])
def test_any_change_to_the_inputs_changes_the_digest(tmp_path: Path, change: str) -> None:
    root = _folder(tmp_path / "images")
    spec = f"imagefolder:{root}"
    before = _described(spec)
    victim = root / "dog" / "000.png"
    info = victim.stat()
    if change == "add an image":
        (root / "cat" / "new.png").write_bytes(noise_png(seed=99))
    elif change == "grow a file":  # the same mtime: the size alone tells
        with open(victim, "ab") as stream:
            stream.write(b"\0")
        os.utime(victim, ns=(info.st_atime_ns, info.st_mtime_ns))
    elif change == "touch a file":  # the same bytes, a new mtime
        os.utime(victim, ns=(info.st_atime_ns, info.st_mtime_ns + 1_000_000_000))
    else:
        victim.rename(root / "dog" / "001.png")
    after = _described(spec)
    assert after["digest"] != before["digest"]
    assert after["file_count"] == before["file_count"] + (change == "add an image")


def test_the_entries_are_those_ingest_walks_with_links_treated_alike(tmp_path: Path) -> None:
    root = _folder(tmp_path / "images")
    (root / "README.txt").write_text("not in a class folder: still an input (rejected)")
    (root / "cat" / "alias.png").symlink_to(root / "dog" / "000.png")  # a link to a file: read (its target's bytes)
    (root / "cat" / "dogs").symlink_to(root / "dog")  # a link to a folder: an entry, never followed
    spec = f"imagefolder:{root}"
    before = _described(spec)
    assert before["file_count"] == ImageFolder(root, DataConfig().max_input_bytes).count() == 6
    (root / "cat" / "alias.png").unlink()
    (root / "cat" / "alias.png").symlink_to(root / "cat" / "001.png")  # retargeted: another input
    assert _described(spec)["digest"] != before["digest"]


def test_a_missing_folder_is_one_line_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-folder"
    with pytest.raises(IngestError, match=rf"^{missing}: image folder not found$"):
        fingerprint(DataConfig(source=f"imagefolder:{missing}"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(IngestError, match="not a folder"):
        fingerprint(DataConfig(source=f"imagefolder:{tmp_path / 'file'}"))


def test_val_source_is_described_and_in_the_digest(tmp_path: Path) -> None:
    train, val = _folder(tmp_path / "train"), _folder(tmp_path / "val", images=2)
    cfg = DataConfig(source=f"imagefolder:{train}", val_source=f"imagefolder:{val}")
    described = fingerprint(cfg)
    assert (described["source"]["file_count"], described["val_source"]["file_count"]) == (3, 2)
    (val / "dog" / "extra.png").write_bytes(noise_png(seed=7))
    again = fingerprint(cfg)
    assert again["source"] == described["source"] and again["digest"] != described["digest"]


# --- Fashion-MNIST ---------------------------------------------------------------------------------


def _fake_fashion_mnist(folder: Path) -> Path:
    folder.mkdir(parents=True)
    for pair in FASHION_MNIST_FILES:
        for name in pair:
            (folder / name).write_bytes(gzip.compress(name.encode() * 10, mtime=0))
    return folder


def test_fashion_mnist_is_the_sha256_of_its_four_files(tmp_path: Path) -> None:
    folder = _fake_fashion_mnist(tmp_path / "fmnist")
    described = _described("fashion-mnist", fashion_mnist_dir=str(folder))
    expected = {p.name: {"sha256": hashlib.sha256(p.read_bytes()).hexdigest(), "size": p.stat().st_size}
                for p in folder.iterdir()}
    assert described["files"] == expected and described["file_count"] == 4
    assert described["total_bytes"] == sum(f["size"] for f in expected.values())
    os.utime(folder / "t10k-labels-idx1-ubyte.gz", ns=(0, 0))  # contents are hashed, so a touch changes nothing
    assert _described("fashion-mnist", fashion_mnist_dir=str(folder)) == described
    (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"other", mtime=0))
    assert _described("fashion-mnist", fashion_mnist_dir=str(folder))["digest"] != described["digest"]


def test_missing_fashion_mnist_names_the_folder_and_the_package(tmp_path: Path) -> None:
    with pytest.raises(IngestError, match=rf"^{tmp_path / 'none'}: Fashion-MNIST files missing .*dataset-fashion-mnist"):
        _described("fashion-mnist", fashion_mnist_dir=str(tmp_path / "none"))


def test_the_configured_fashion_mnist_matches_its_files() -> None:
    folder = Path(DataConfig().fashion_mnist_dir)
    if not folder.is_dir():
        pytest.skip(f"{folder} absent (apt-get install dataset-fashion-mnist)")
    described = _described("fashion-mnist")
    name = "t10k-labels-idx1-ubyte.gz"
    assert described["files"][name]["sha256"] == hashlib.sha256((folder / name).read_bytes()).hexdigest()


# --- WebDataset shards -----------------------------------------------------------------------------


def _shards(folder: Path, count: int = 3) -> Path:
    for i in range(count):
        write_tar(folder / f"train-{i:06d}.tar", [(f"s{i}.png", noise_png(seed=i)), (f"s{i}.cls", b"0")])
    return folder


def test_local_shards_are_listed_in_order_with_size_and_mtime(tmp_path: Path) -> None:
    folder = _shards(tmp_path / "shards")
    by_folder = _described(f"webdataset:{folder}")
    by_braces = _described(f"webdataset:{folder}/train-{{000000..000002}}.tar")
    assert [s["url"] for s in by_folder["shards"]] == [str(folder / f"train-{i:06d}.tar") for i in range(3)]
    assert by_braces["shards"] == by_folder["shards"]
    first = folder / "train-000000.tar"
    assert by_folder["shards"][0] == {"url": str(first), "size": first.stat().st_size,
                                      "mtime_ns": first.stat().st_mtime_ns}
    os.utime(first, ns=(0, first.stat().st_mtime_ns + 1))
    assert _described(f"webdataset:{folder}")["digest"] != by_folder["digest"]
    missing = folder / "train-000007.tar"
    with pytest.raises(IngestError, match=rf"^{missing}: shard not found"):
        fingerprint(DataConfig(source=f"webdataset:{missing}"))


class _Tagged(http.server.SimpleHTTPRequestHandler):
    """Serves its folder with an ETag per path from `etags`; logs each request's method and path."""

    etags: dict[str, str]
    requests: list[str]

    def send_head(self):  # type: ignore[no-untyped-def]
        self.requests.append(f"{self.command} {self.path}")
        return super().send_head()

    def end_headers(self) -> None:
        if self.path in self.etags:
            self.send_header("ETag", self.etags[self.path])
        super().end_headers()

    def log_message(self, *args: object) -> None:
        pass


class _ObjectHeads(http.server.BaseHTTPRequestHandler):
    """Path-style S3 HeadObject: `/<bucket>/<key>` from `objects` ({path: (etag, size)}), 404 otherwise."""

    objects: dict[str, tuple[str, int]]

    def do_HEAD(self) -> None:
        found = self.objects.get(urllib.parse.unquote(urllib.parse.urlsplit(self.path).path))
        self.send_response(200 if found else 404)
        if found:
            self.send_header("ETag", found[0])
            self.send_header("Content-Length", str(found[1]))
        else:
            self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def http_shards(tmp_path: Path) -> Iterator[tuple[str, dict[str, str], list[str]]]:
    """(base URL, the ETags by path, the request log) of a server of two shards under /shards/."""
    root = tmp_path / "served"
    _shards(root / "shards", count=2)
    etags = {f"/shards/train-{i:06d}.tar": f'"v1-{i}"' for i in range(2)}
    requests: list[str] = []
    handler = type("Handler", (_Tagged,), {"etags": etags, "requests": requests})
    for base in serve_http(functools.partial(handler, directory=str(root))):
        yield base, etags, requests


def test_http_shards_are_identified_by_a_head_request(http_shards, tmp_path: Path) -> None:
    base, etags, requests = http_shards
    spec = f"webdataset:{base}/shards/train-{{000000..000001}}.tar"
    described = _described(spec)
    size = (tmp_path / "served" / "shards" / "train-000000.tar").stat().st_size
    first = described["shards"][0]
    assert first["url"] == f"{base}/shards/train-000000.tar"
    assert (first["etag"], first["size"]) == ('"v1-0"', size) and "GMT" in first["last_modified"]
    assert sorted(requests) == ["HEAD /shards/train-000000.tar", "HEAD /shards/train-000001.tar"]  # no body fetched
    assert _described(spec) == described
    etags["/shards/train-000001.tar"] = '"v2-1"'  # the object was replaced on the server
    assert _described(spec)["digest"] != described["digest"]
    missing = f"{base}/shards/train-000009.tar"
    with pytest.raises(IngestError, match=rf"^{missing}: HTTP 404"):
        fingerprint(DataConfig(source=f"webdataset:{missing}"))


def test_s3_shards_are_identified_by_head_object(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    objects = {"/datasets/train-000000.tar": ('"abc"', 1234)}
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    for name, value in {"AWS_CONFIG_FILE": str(tmp_path / "none"), "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
                        "AWS_EC2_METADATA_DISABLED": "true", "AWS_DEFAULT_REGION": "us-east-1",
                        "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"}.items():
        monkeypatch.setenv(name, value)
    for base in serve_http(type("Store", (_ObjectHeads,), {"objects": objects})):
        monkeypatch.setenv("ALIGNTOK_DATA_S3_ENDPOINT_URL", base)
        described = _described("webdataset:s3://datasets/train-000000.tar")
        assert described["shards"] == [{"url": "s3://datasets/train-000000.tar", "etag": '"abc"', "size": 1234}]
        with pytest.raises(IngestError, match=r"^s3://datasets/gone\.tar: S3 error 404"):
            fingerprint(DataConfig(source="webdataset:s3://datasets/gone.tar"))


# --- the command ----------------------------------------------------------------------------------


def test_snapshot_command_writes_the_json_and_prints_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"data": {"source": f"imagefolder:{_folder(tmp_path / 'images')}"}}))
    out = tmp_path / "data" / "source.json"
    assert main(["--params", str(params), "snapshot", "--out", str(out)]) == 0  # with its progress bar (stderr)
    printed = capsys.readouterr().out.splitlines()
    described = json.loads(out.read_text())
    assert printed == [f"source imagefolder:{tmp_path / 'images'}: 3 files, {described['source']['total_bytes']:,} "
                       f"bytes; digest {described['digest'][:12]} -> {out}"]
    before = out.read_bytes()
    assert main(["--params", str(params), "snapshot", "--out", str(out), "--no-progress"]) == 0
    assert out.read_bytes() == before and sorted(p.name for p in out.parent.iterdir()) == ["source.json"]


def test_snapshot_of_a_missing_source_fails_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"data": {"source": f"imagefolder:{tmp_path / 'gone'}"}}))
    assert main(["--params", str(params), "snapshot", "--out", str(tmp_path / "source.json")]) == 1
    assert capsys.readouterr().err == f"aligntok snapshot: error: {tmp_path / 'gone'}: image folder not found\n"
    assert not (tmp_path / "source.json").exists()


# --- under DVC -------------------------------------------------------------------------------------


def _dvc(project: Path, *args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=project, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_dvc_reruns_what_follows_the_snapshot_only_when_the_source_changed(tmp_path: Path) -> None:
    images = _folder(tmp_path / "images")
    project = tmp_path / "project"
    project.mkdir()
    (project / "params.yaml").write_text(yaml.safe_dump({"data": {
        "source": f"imagefolder:{images}", "val_source": None, "fashion_mnist_dir": str(tmp_path / "none")}}))
    count = f"{sys.executable} -c \"import json; print(json.load(open('data/source.json'))['source']['file_count'])\""
    (project / "dvc.yaml").write_text(yaml.safe_dump({"stages": {
        "snapshot": {"cmd": f"{sys.executable} -m aligntok snapshot --no-progress --out data/source.json",
                     "always_changed": True, "params": ["data.source", "data.val_source", "data.fashion_mnist_dir"],
                     "outs": ["data/source.json"]},
        "downstream": {"cmd": f"{count} > count.txt && echo ran >> runs.log", "deps": ["data/source.json"],
                       "outs": ["count.txt"]},
    }}, sort_keys=False))
    _dvc(project, "init", "--no-scm", "-q")
    first = _dvc(project, "repro")
    assert "Running stage 'snapshot'" in first and "Running stage 'downstream'" in first
    second = _dvc(project, "repro")
    assert "Running stage 'snapshot'" in second  # always_changed: the source is looked at on every run
    assert "Running stage 'downstream'" not in second and (project / "runs.log").read_text() == "ran\n"
    (images / "cat" / "new.png").write_bytes(noise_png(seed=42))
    third = _dvc(project, "repro")
    assert "Running stage 'downstream'" in third and (project / "runs.log").read_text() == "ran\nran\n"
    assert (project / "count.txt").read_text() == "4\n"
