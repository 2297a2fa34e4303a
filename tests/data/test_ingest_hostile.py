"""`aligntok ingest` against hostile inputs (issue 8): bombs in containers, shell URLs, links out
of the source, hostile tar shards, hostile file names and trees, concurrent or self-overwriting runs.

Each test holds an invariant that the unhardened ingest broke; all run as root too (no test
relies on permissions).
"""

from __future__ import annotations

import codecs
import csv
import functools
import http.server
import io
import json
import os
import subprocess
import sys
import tarfile
import threading
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageFile
from pydantic import ValidationError

from aligntok.cli import main
from aligntok.config import DataConfig
from aligntok.data.images import ImagePolicy, process_image
from aligntok.data.ingest import LOCK, IngestError, IngestSummary, _locked, ingest
from aligntok.data.sources import WebDatasetSource
from support.corpus import ico_container, noise_png, png_bomb, write_tar
from support.paths import REPO

CFG = DataConfig(workers=0)


# --- helpers ----------------------------------------------------------------------------------


def rejected_rows(out_dir: Path) -> list[list[str]]:
    with open(out_dir / "rejected.csv", newline="", encoding="utf-8") as stream:
        rows = list(csv.reader(stream))
    assert rows[0] == ["path", "reason"]
    return rows[1:]


def manifest_paths(out_dir: Path) -> list[str]:
    return pq.read_table(out_dir / "manifest.parquet").column("source_path").to_pylist()


def assert_accounted(out_dir: Path, summary: IngestSummary) -> None:
    """Every input ends in exactly one of the manifest and rejected.csv."""
    accepted, rejected = manifest_paths(out_dir), [path for path, _ in rejected_rows(out_dir)]
    assert len(accepted) + len(rejected) == summary.inputs
    assert not set(accepted) & set(rejected)


def write_png(path: Path, seed: int, size: int = 20) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(noise_png(seed, size))


def sample(key: str, label: str, seed: int) -> list[tuple[str, bytes]]:
    """The tar members of one WebDataset sample: `key.cls` and `key.png`."""
    return [(f"{key}.cls", label.encode()), (f"{key}.png", noise_png(seed))]


def ingest_folder(root: Path, out: Path, cfg: DataConfig = CFG) -> IngestSummary:
    return ingest(f"imagefolder:{root}", out, cfg, progress=False)


@pytest.fixture(scope="module")
def ico_bomb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 48 KB ICO whose PNG claims 20000x20000 (400 MB once decoded as mode 1)."""
    path = tmp_path_factory.mktemp("bomb") / "icon_bomb.png"  # the extension says PNG
    path.write_bytes(ico_container(png_bomb(20000, 20000)))
    assert path.stat().st_size < 100_000
    return path


# --- 1. a decompression bomb inside a container format -----------------------------------------

# The peak RSS of the child's own memory: VmHWM. (ru_maxrss would count the pytest process it
# was forked from, torch and all, and hide a 400 MB decode.)
_PEAK_MEMORY = """
import json, re, sys
from aligntok.config import DataConfig
from aligntok.data.images import ImagePolicy, process_image

def peak_kib():
    return int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1))

policy = ImagePolicy.from_config(DataConfig(formats=json.loads(sys.argv[2])))
data, warm_up = open(sys.argv[1], "rb").read(), open(sys.argv[3], "rb").read()
process_image(warm_up, policy)  # loads every Pillow plugin before measuring
before = peak_kib()
reason = process_image(data, policy).reason
print(json.dumps({"reason": reason, "peak_growth_kib": peak_kib() - before}))
"""


def probe_in_subprocess(path: Path, formats: list[str], tmp_path: Path) -> dict:
    """Run `process_image` on `path` in a fresh interpreter; its reason and peak-RSS growth (Linux)."""
    warm_up = tmp_path / "warm_up.png"
    warm_up.write_bytes(noise_png(0))
    command = [sys.executable, "-c", _PEAK_MEMORY, str(path), json.dumps(formats), str(warm_up)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=120, check=True)
    return json.loads(done.stdout.splitlines()[-1])


def test_ico_wrapped_bomb_is_rejected_by_format_with_little_memory(ico_bomb: Path, tmp_path: Path) -> None:
    outcome = probe_in_subprocess(ico_bomb, CFG.formats, tmp_path)
    assert outcome["peak_growth_kib"] < 50 * 1024  # unguarded, it grew by 394 MB here
    assert outcome["reason"] == "unsupported format: ICO (data.formats: PNG, JPEG, WEBP, GIF, BMP, TIFF, PPM)"


def test_ico_bomb_is_too_large_without_decoding_even_when_ico_is_allowed(
    ico_bomb: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    formats = [*CFG.formats, "ICO"]
    outcome = probe_in_subprocess(ico_bomb, formats, tmp_path)
    assert outcome["peak_growth_kib"] < 50 * 1024
    assert outcome["reason"] == "too large: an embedded image of 400000000 pixels > max_pixels 89478485"

    def no_decoding(image: ImageFile.ImageFile) -> None:
        raise AssertionError(f"decoded a {image.size} image")

    policy = ImagePolicy.from_config(DataConfig(formats=formats))
    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    assert process_image(ico_bomb.read_bytes(), policy).reason == outcome["reason"]


def test_allowed_formats_decide_what_is_opened() -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(buffer, format="ICO")
    icon = buffer.getvalue()
    with_ico = ImagePolicy.from_config(DataConfig(formats=["PNG", "ICO"]))
    assert process_image(icon, with_ico).encoded is not None  # a real icon opens where ICO is allowed
    only_png = ImagePolicy.from_config(DataConfig(formats=["PNG"]))
    assert process_image(icon, only_png).reason == "unsupported format: ICO (data.formats: PNG)"
    assert process_image(noise_png(1), only_png).encoded is not None


def test_ingest_names_the_refused_format_and_unknown_format_names(ico_bomb: Path, tmp_path: Path) -> None:
    write_png(tmp_path / "src/class_0/good.png", seed=1)
    (tmp_path / "src/class_0/icon_bomb.png").write_bytes(ico_bomb.read_bytes())
    summary = ingest_folder(tmp_path / "src", tmp_path / "out")
    assert rejected_rows(tmp_path / "out") == [
        ["class_0/icon_bomb.png", "unsupported format: ICO (data.formats: PNG, JPEG, WEBP, GIF, BMP, TIFF, PPM)"]
    ]
    assert_accounted(tmp_path / "out", summary)
    with pytest.raises(IngestError, match="data.formats: Pillow cannot read NOPE"):
        ingest_folder(tmp_path / "src", tmp_path / "out2", DataConfig(workers=0, formats=["PNG", "NOPE"]))
    with pytest.raises(ValidationError, match="Pillow format names in capitals"):
        DataConfig(formats=["png"])


# --- 2. shell commands through webdataset URLs ------------------------------------------------


@pytest.fixture
def shards(tmp_path: Path) -> Path:
    """A folder with one hand-made shard of three labelled samples."""
    folder = tmp_path / "shards"
    folder.mkdir()
    write_tar(folder / "train-000000.tar", [*sample("a", "0", 1), *sample("b", "1", 2), *sample("c", "1", 3)])
    return folder


def test_pipe_source_is_refused_and_never_run(shards: Path, tmp_path: Path) -> None:
    marker = tmp_path / "owned.txt"
    for spec in (f"webdataset:pipe:touch {marker}", f"webdataset:{shards}/train-000000.tar::pipe:touch {marker}"):
        refused = r"'pipe:' is not allowed for shards; use a local path, file://, http://, https:// or s3://"
        with pytest.raises(IngestError, match=refused):
            ingest(spec, tmp_path / "out", CFG, progress=False)
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_cli_refuses_a_pipe_source_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["--params", str(REPO / "params.yaml"), "ingest", "webdataset:pipe:id > owned.txt", "out"]) != 0
    errors = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(errors) == 1 and "'pipe:' is not allowed" in errors[0]
    assert not (tmp_path / "owned.txt").exists()


def test_gopen_rewrite_cannot_turn_a_shard_into_a_command(
    shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = tmp_path / "rewritten.txt"
    monkeypatch.setenv("GOPEN_REWRITE", f"{shards}/=pipe:touch {marker} #")  # webdataset's gopen obeys this
    summary = ingest(f"webdataset:{shards}", tmp_path / "out", CFG, progress=False)
    assert (summary.inputs, summary.rejected) == (3, 0)
    assert not marker.exists()


@pytest.fixture
def http_root(shards: Path) -> Iterator[str]:
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(shards))
    handler.log_message = lambda *args: None  # type: ignore[method-assign]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_http_and_file_urls_are_read_without_a_shell(shards: Path, http_root: str, tmp_path: Path) -> None:
    for name, url in (("http", f"{http_root}/train-000000.tar"), ("file", f"file://{shards}/train-000000.tar")):
        summary = ingest(f"webdataset:{url}", tmp_path / name, CFG, progress=False)
        assert (summary.inputs, summary.rejected) == (3, 0), name
        assert all(path.startswith(f"{url}#") for path in manifest_paths(tmp_path / name))
    with pytest.raises(IngestError, match="file:// URL names another host"):
        ingest(f"webdataset:file://elsewhere{shards}/train-000000.tar", tmp_path / "x", CFG, progress=False)


class _S3Store(http.server.BaseHTTPRequestHandler):
    """A path-style S3 GetObject endpoint: `/<bucket>/<key>` from `objects`; logs the decoded paths."""

    objects: dict[str, bytes]
    paths: list[str]

    def do_GET(self) -> None:
        path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
        self.paths.append(path)
        body = self.objects.get(path)
        self.send_response(200 if body is not None else 404)
        self.send_header("Content-Length", str(len(body or b"")))
        self.end_headers()
        self.wfile.write(body or b"")

    def log_message(self, *args: object) -> None:
        pass


def test_s3_urls_are_read_through_boto3_with_the_key_taken_literally(
    shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """boto3 against an S3 stand-in on 127.0.0.1 (`ALIGNTOK_DATA_S3_ENDPOINT_URL`), with no `aws` anywhere on
    PATH: the key reaches the store as it is written, and nothing in it is run."""
    marker = tmp_path / "owned.txt"
    key = f"train;touch {marker} $(touch {marker}).tar"
    store = type("Store", (_S3Store,), {"objects": {f"/bucket/{key}": (shards / "train-000000.tar").read_bytes()},
                                         "paths": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), store)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    monkeypatch.setenv("PATH", str(empty_bin))  # the project image has no AWS CLI either
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    monkeypatch.setenv("ALIGNTOK_DATA_S3_ENDPOINT_URL", f"http://127.0.0.1:{server.server_address[1]}")
    try:
        summary = ingest(f"webdataset:s3://bucket/{key}", tmp_path / "out", CFG, progress=False)
        assert (summary.inputs, summary.rejected) == (3, 0)
        assert store.paths == [f"/bucket/{key}"]
        with pytest.raises(IngestError, match=r"^s3://bucket/absent\.tar: S3 error 404 \(HTTP 404\)"):
            ingest("webdataset:s3://bucket/absent.tar", tmp_path / "out2", CFG, progress=False)
    finally:
        server.shutdown()
        server.server_close()
    assert not marker.exists()


# --- 3. links out of the source folder --------------------------------------------------------


def test_links_out_of_the_source_folder_are_rejected(tmp_path: Path) -> None:
    root = tmp_path / "src"
    write_png(root / "class_0/inside.png", seed=1)
    write_png(tmp_path / "elsewhere/secret.png", seed=2)
    (root / "class_0/etc").symlink_to("/etc")
    (root / "class_0/elsewhere").symlink_to(tmp_path / "elsewhere")
    (root / "class_0/secret.png").symlink_to(tmp_path / "elsewhere/secret.png")
    (root / "class_0/alias.png").symlink_to(root / "class_0/inside.png")  # resolves inside: read
    summary = ingest_folder(root, tmp_path / "out")
    assert rejected_rows(tmp_path / "out") == [
        ["class_0/elsewhere", f"outside the source folder: links to {tmp_path / 'elsewhere'}"],
        ["class_0/etc", f"outside the source folder: links to {os.path.realpath('/etc')}"],
        ["class_0/inside.png", "duplicate of class_0/alias.png"],
        ["class_0/secret.png", f"outside the source folder: links to {tmp_path / 'elsewhere/secret.png'}"],
    ]
    assert manifest_paths(tmp_path / "out") == ["class_0/alias.png"]
    assert_accounted(tmp_path / "out", summary)


def test_class_folder_linking_to_a_sibling_is_rejected_not_counted_twice(tmp_path: Path) -> None:
    root = tmp_path / "src"
    for index in range(3):
        write_png(root / f"a/{index}.png", seed=index)
    (root / "b").symlink_to("a")
    (root / "a/loop").symlink_to("..")
    summary = ingest_folder(root, tmp_path / "out")
    assert summary.classes == ["a"]
    assert rejected_rows(tmp_path / "out") == [
        ["a/loop", "link to a folder: not followed (its target '.' is read under its own path)"],
        ["b", "link to a folder: not followed (its target 'a' is read under its own path)"],
    ]
    assert sorted(manifest_paths(tmp_path / "out")) == ["a/0.png", "a/1.png", "a/2.png"]
    assert_accounted(tmp_path / "out", summary)
    (tmp_path / "links_only").mkdir()
    (tmp_path / "links_only/a").symlink_to(root / "a")
    with pytest.raises(IngestError, match=r"no class folders; .*links to folders are not followed \(1, e\.g\. 'a'\)"):
        ingest_folder(tmp_path / "links_only", tmp_path / "out2")


# --- 4. hostile tar shards --------------------------------------------------------------------


def test_hostile_samples_become_rejection_rows(tmp_path: Path) -> None:
    members = [
        *sample("good", "0", 1),
        *sample("big_label", "5000", 2),
        *sample("big_image", "0", 3)[:1], ("big_image.png", noise_png(4, size=64)),
        *sample("twice", "0", 5), ("twice.png", noise_png(6)),
        ("README", b"not a sample"),
    ]  # fmt: skip
    write_tar(tmp_path / "shards/train-000000.tar", members)
    cfg = DataConfig(workers=0, max_label=1000, max_input_bytes=4096)
    summary = ingest(f"webdataset:{tmp_path / 'shards'}", tmp_path / "out", cfg, progress=False)
    shard = tmp_path / "shards/train-000000.tar"
    big = len(noise_png(4, size=64))
    assert big > 4096
    assert rejected_rows(tmp_path / "out") == [
        [f"{shard}#README", "not a sample: a tar member without an extension"],
        [f"{shard}#big_image", f"too large: 'png' entry of {big} bytes > max_input_bytes 4096"],
        [f"{shard}#big_label", "no label: label 5000 > max_label 1000"],
        [f"{shard}#twice", "malformed sample: two 'png' entries"],
    ]
    assert summary.classes == ["0"]
    assert_accounted(tmp_path / "out", summary)


def test_default_label_cap_refuses_a_billion_classes(tmp_path: Path) -> None:
    write_tar(tmp_path / "s.tar", sample("huge", "999999999", 1))
    source = WebDatasetSource(str(tmp_path / "s.tar"), CFG.max_input_bytes, CFG.max_label)
    assert [item.reason for item in source] == ["no label: label 999999999 > max_label 99999"]
    assert source.classes() == []


def test_a_sample_image_is_one_of_the_sample_image_entries_and_nothing_else_is_read(tmp_path: Path) -> None:
    members = [
        ("png_and_jfif.cls", b"0"), ("png_and_jfif.jfif", b"never read"), ("png_and_jfif.png", noise_png(1)),
        ("gif_only.cls", b"0"), ("gif_only.gif", noise_png(2)),
        ("big_extra.cls", b"0"), ("big_extra.png", noise_png(3)), ("big_extra.ppm", bytes(4097)),
    ]  # fmt: skip
    write_tar(tmp_path / "s.tar", members)
    items = list(WebDatasetSource(str(tmp_path / "s.tar"), 4096, CFG.max_label))  # the .ppm is over the cap
    assert [(item.data, item.reason) for item in items] == [
        (noise_png(1), None),
        (None, "not an image: no jpg/jpeg/png/webp/bmp/tif/tiff entry (has: cls, gif)"),
        (noise_png(3), None),
    ]


def test_image_folder_files_over_the_cap_are_rejected_unread(tmp_path: Path) -> None:
    write_png(tmp_path / "src/class_0/small.png", seed=1)
    write_png(tmp_path / "src/class_0/big.png", seed=2, size=64)
    size = (tmp_path / "src/class_0/big.png").stat().st_size
    summary = ingest_folder(tmp_path / "src", tmp_path / "out", DataConfig(workers=0, max_input_bytes=4096))
    assert rejected_rows(tmp_path / "out") == [["class_0/big.png", f"too large: {size} bytes > max_input_bytes 4096"]]
    assert_accounted(tmp_path / "out", summary)


def damaged(data: bytes, damage: str) -> bytes:
    """The shard of `shards` damaged in one way; each sample takes 6 blocks (cls: header + 1, png: header + 3)."""
    block = tarfile.BLOCKSIZE
    if damage == "garbage":
        return b"\x8b" * 3000
    if damage == "cut_in_data":
        return data[: 3 * block + 100]  # inside the first png
    if damage == "cut_at_member":
        return data[: 6 * block]  # after the first sample: a tar reader just sees a shorter archive
    if damage == "bad_header":  # the second sample's cls header
        return data[: 6 * block] + b"\xff" * block + data[7 * block :]
    raise ValueError(damage)


@pytest.mark.parametrize("damage", ["garbage", "cut_in_data", "cut_at_member", "bad_header"])
def test_malformed_shard_is_one_clear_error_naming_it(damage: str, shards: Path, tmp_path: Path) -> None:
    shard = shards / "train-000000.tar"
    data = shard.read_bytes()
    assert 2 * tarfile.BLOCKSIZE < len(noise_png(1)) <= 3 * tarfile.BLOCKSIZE  # as `damaged` counts
    shard.write_bytes(damaged(data, damage))
    with pytest.raises(IngestError) as raised:
        ingest(f"webdataset:{shards}", tmp_path / "out", CFG, progress=False)
    message = str(raised.value)
    assert message.startswith(f"{shard}: cannot read this tar shard (") and "\n" not in message
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == []  # staging and lock cleaned up


# --- 5. file names and trees ------------------------------------------------------------------


def test_non_utf8_names_are_rejected_and_written_losslessly(tmp_path: Path) -> None:
    root = tmp_path / "src"
    write_png(root / "class_0/good.png", seed=1)
    odd = os.fsencode(root / "class_0") + b"/caf\xe9 back\\slash.png"
    with open(odd, "wb") as stream:
        stream.write(noise_png(2))
    summary = ingest_folder(root, tmp_path / "out")
    [[path, reason]] = rejected_rows(tmp_path / "out")
    assert path == "class_0/caf\\xe9 back\\\\slash.png"
    assert codecs.escape_decode(path.encode())[0] == b"class_0/caf\xe9 back\\slash.png"
    assert reason.startswith("unsupported name: not valid UTF-8")
    assert manifest_paths(tmp_path / "out") == ["class_0/good.png"]
    assert_accounted(tmp_path / "out", summary)


def test_names_with_line_breaks_and_quotes_keep_one_row_each(tmp_path: Path) -> None:
    root = tmp_path / "src"
    write_png(root / "class_0/good.png", seed=1)
    names = ["class_0/a\rb.txt", 'class_0/c"d,e\nf.txt', "class_0/\r"]
    for name in names:
        (root / name).write_text("x")
    summary = ingest_folder(root, tmp_path / "out")
    assert [path for path, _ in rejected_rows(tmp_path / "out")] == sorted(names)
    text = (tmp_path / "out/rejected.csv").read_bytes()
    assert text.startswith(b'"path","reason"\n"class_0/\r","unsupported extension')  # every field quoted
    assert_accounted(tmp_path / "out", summary)


def remove_tree(top: Path) -> None:
    """`shutil.rmtree` without its recursion (which fails on a tree 1,100 deep, so pytest could not
    clean up its old temporary folders)."""
    folders = [top]
    for folder in folders:  # breadth first: the list grows while it is read
        for entry in os.scandir(folder):
            if entry.is_dir(follow_symlinks=False):
                folders.append(Path(entry.path))
            else:
                os.unlink(entry.path)
    for folder in reversed(folders):
        folder.rmdir()


@pytest.fixture
def deep_tree(tmp_path: Path) -> Iterator[Path]:
    """An image folder whose `class_0` holds an image 1,100 folders down, `class_1` one at the top."""
    deep = tmp_path / "src/class_0"
    deep.mkdir(parents=True)
    try:
        for _ in range(1100):  # one by one: `mkdir(parents=True)` itself recurses once per level
            deep = deep / "d"
            deep.mkdir()
        write_png(deep / "bottom.png", seed=1)
        write_png(tmp_path / "src/class_1/top.png", seed=2)
        yield tmp_path / "src"
    finally:
        remove_tree(tmp_path / "src")


def test_a_tree_1100_folders_deep_is_walked(deep_tree: Path, tmp_path: Path) -> None:
    summary = ingest_folder(deep_tree, tmp_path / "out")
    assert (summary.inputs, summary.rejected) == (2, 0)
    assert len(max(manifest_paths(tmp_path / "out"), key=len)) == len("class_0/") + 2 * 1100 + len("bottom.png")


def make_folders_past_path_max(start: Path, name_length: int = 250, depth: int = 20) -> bytes:
    """Nest `depth` folders under `start` by file descriptor (no path may exceed PATH_MAX, 4096
    bytes, in a system call, so the deep ones exist but cannot be listed by path); returns the
    deepest one's path relative to `start`."""
    fd = os.open(start, os.O_RDONLY | os.O_DIRECTORY)
    names = [f"{level:02d}".encode() + b"x" * (name_length - 2) for level in range(depth)]
    try:
        for name in names:
            os.mkdir(name, dir_fd=fd)
            inner = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = inner
        image = os.open("deepest.png", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.write(image, noise_png(3))
        os.close(image)
    finally:
        os.close(fd)
    return b"/".join(names)


def test_a_folder_that_cannot_be_listed_gets_a_rejection_row(tmp_path: Path) -> None:
    """Root reads any folder whatever its mode, so the unlistable folder here is one whose path is
    longer than PATH_MAX: a real condition that `os.scandir` reports (ENAMETOOLONG)."""
    root = tmp_path / "src"
    write_png(root / "class_0/good.png", seed=1)
    deepest = make_folders_past_path_max(root / "class_0")
    summary = ingest_folder(root, tmp_path / "out")
    [[path, reason]] = rejected_rows(tmp_path / "out")
    assert reason == "unreadable folder: File name too long"
    assert ("class_0/" + deepest.decode()).startswith(path) and len(str(root / path)) >= 4096
    assert (summary.inputs, summary.rejected) == (2, 1)
    assert_accounted(tmp_path / "out", summary)


# --- 6. concurrent runs, and an output inside the input ---------------------------------------


def test_second_ingest_into_a_held_folder_fails_and_keeps_the_holders_work(tmp_path: Path) -> None:
    write_png(tmp_path / "src/class_0/a.png", seed=1)
    out = tmp_path / "out"
    out.mkdir()
    with _locked(out):
        (out / ".partial").mkdir()
        (out / ".partial/spool.bin").write_bytes(b"the holder's work")
        with pytest.raises(IngestError, match=rf"{out}: another ingest \(pid {os.getpid()}\) is writing this folder"):
            ingest_folder(tmp_path / "src", out)
        assert (out / ".partial/spool.bin").read_bytes() == b"the holder's work"
    assert not (out / LOCK).exists()


def test_a_stale_lock_is_taken_over(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_png(tmp_path / "src/class_0/a.png", seed=1)
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()  # its pid is no longer running
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / LOCK).write_text(f"{finished.pid}\n")
    summary = ingest_folder(tmp_path / "src", tmp_path / "out")
    assert summary.train + summary.val == 1
    assert f"taking over the lock of pid {finished.pid}" in caplog.text
    assert not (tmp_path / "out" / LOCK).exists()


def test_a_lock_file_planted_as_a_link_is_not_followed(tmp_path: Path) -> None:
    write_png(tmp_path / "src/class_0/a.png", seed=1)
    (tmp_path / "precious.txt").write_text("keep me\n")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / LOCK).symlink_to(tmp_path / "precious.txt")
    with pytest.raises(IngestError, match=rf"{LOCK}: cannot open the lock file"):
        ingest_folder(tmp_path / "src", tmp_path / "out")
    assert (tmp_path / "precious.txt").read_text() == "keep me\n"


def test_output_equal_to_or_inside_the_input_is_refused(shards: Path, tmp_path: Path) -> None:
    before = {path: path.read_bytes() for path in shards.iterdir()}
    for out in (shards, shards / "again"):
        with pytest.raises(IngestError, match=rf"{out}: output folder is or lies inside the source folder {shards}"):
            ingest(f"webdataset:{shards}", out, CFG, progress=False)
    with pytest.raises(IngestError, match="inside the source folder"):
        ingest(f"webdataset:{shards}/train-{{000000..000000}}.tar", shards, CFG, progress=False)
    assert {path: path.read_bytes() for path in shards.iterdir()} == before
