"""The random-access shard reader and the DataLoader batches: the same records and batches as reading the shards
front to back (what `load_split` did before it mapped them), at any worker count, resume step and rank;
one-line errors for broken shards; remote folders over a real HTTP server on loopback."""

from __future__ import annotations

import functools
import http.server
import pickle
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from aligntok.config import DataConfig
from aligntok.data.ingest import ingest
from aligntok.data.loader import ImageSet, StepBatches, StepSampler, batch_indices, iter_shard, load_split
from aligntok.data.reader import ShardError, ShardReader, read_dataset_info

BATCH, SEED = 8, 3


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real ingest of 45 JPEG photos-like images in 3 classes, 7 records a shard (train spans 6 shards)."""
    root = tmp_path_factory.mktemp("reader")
    rng = np.random.default_rng(0)
    for label, name in enumerate(("ant", "bee", "cat")):
        (root / "src" / name).mkdir(parents=True)
        for i in range(15):
            gradient = np.linspace(0, 255, 20, dtype=np.uint8)[None, :, None] * (label + 1) // 3
            pixels = (rng.integers(0, 60, (20, 20, 3)) + gradient).clip(0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / "src" / name / f"{i:02d}.png")
    cfg = DataConfig(workers=0, resolution=16, min_side=8, image_format="jpeg", shard_max_count=7, val_fraction=0.2)
    ingest(f"imagefolder:{root / 'src'}", root / "out", cfg, progress=False)
    return root / "out"


def streamed(folder: Path, split: str) -> ImageSet:
    """The split read front to back, shard by shard, into memory: the old `load_split`."""
    records = [record for name in read_dataset_info(folder)["shards"][split] for record in iter_shard(folder / name)]
    return ImageSet(encoded=[data for _, data, _ in records], labels=torch.tensor([lab for *_, lab in records]),
                    keys=[key for key, *_ in records])


def test_reader_yields_the_records_of_the_shards_in_order(shards: Path) -> None:
    for split in ("train", "val"):
        old, new = streamed(shards, split), load_split(shards, split)
        assert isinstance(new, ShardReader) and len(new) == len(old) > 0
        assert new.keys == old.keys
        assert torch.equal(new.labels, old.labels)
        assert [new.record_bytes(i) for i in range(len(new))] == old.encoded
    assert len(load_split(shards, "train").names) >= 5  # the records really span several shards


def test_limit_and_head_keep_the_first_records(shards: Path) -> None:
    old = streamed(shards, "train")
    for reader in (load_split(shards, "train", limit=10), load_split(shards, "train").head(10)):
        assert len(reader) == 10 and reader.keys == old.keys[:10]
        with pytest.raises(IndexError):
            reader.record_bytes(10)


@pytest.mark.parametrize("workers, threads", [(0, 0), (0, 3), (2, 0)])
def test_step_batches_equal_the_old_loader_at_any_worker_count(shards: Path, workers: int, threads: int) -> None:
    old = streamed(shards, "train")
    batches = StepBatches(load_split(shards, "train", decode_threads=threads), BATCH, SEED, steps=6, workers=workers)
    try:
        for step in range(6):
            images, labels = batches(step)
            want_images, want_labels = old.batch(batch_indices(len(old), BATCH, SEED, step))
            assert images.dtype == want_images.dtype == torch.float32
            assert torch.equal(images, want_images) and torch.equal(labels, want_labels)
    finally:
        batches.close()


def test_resume_mid_epoch_and_out_of_order_calls_are_bit_identical(shards: Path) -> None:
    reader = load_split(shards, "train")
    straight = StepBatches(reader, BATCH, SEED, steps=7, workers=2)
    resumed = StepBatches(reader, BATCH, SEED, steps=7, workers=2)
    try:
        everything = [straight(step) for step in range(7)]
        for step in (4, 5, 6, 2, 3):  # resumes at 4; then a step out of order restarts the loader there
            got = resumed(step)
            assert all(torch.equal(a, b) for a, b in zip(got, everything[step]))
    finally:
        straight.close()
        resumed.close()


def test_ranks_get_disjoint_slices_that_make_up_the_global_batch(shards: Path) -> None:
    reader = load_split(shards, "train")
    for step in range(4):
        whole = next(iter(StepSampler(len(reader), BATCH, SEED, step, step + 1)))
        parts = [next(iter(StepSampler(len(reader), BATCH, SEED, step, step + 1, slice(r * BATCH // 2, (r + 1) * BATCH // 2))))
                 for r in range(2)]
        assert parts[0] + parts[1] == whole and not set(parts[0]) & set(parts[1])
        per_rank = [StepBatches(reader, BATCH, SEED, 4, slice(r * BATCH // 2, (r + 1) * BATCH // 2))(step) for r in range(2)]
        global_batch = StepBatches(reader, BATCH, SEED, 4)(step)
        assert torch.equal(torch.cat([p[0] for p in per_rank]), global_batch[0])


def test_a_pickled_reader_carries_no_maps_and_reads_the_same(shards: Path) -> None:
    reader = load_split(shards, "train")
    first = reader.batch(torch.arange(5))
    assert reader._open  # mapped now
    copy = pickle.loads(pickle.dumps(reader))
    assert copy._open == {} and len(pickle.dumps(reader)) < 20_000
    assert torch.equal(copy.batch(torch.arange(5))[0], first[0])


def _copy(shards: Path, tmp_path: Path) -> tuple[Path, str]:
    folder = tmp_path / "copy"
    shutil.copytree(shards, folder)
    return folder, read_dataset_info(folder)["shards"]["train"][1]


def test_a_truncated_shard_is_named_in_one_line(shards: Path, tmp_path: Path) -> None:
    folder, name = _copy(shards, tmp_path)
    data = (folder / name).read_bytes()
    (folder / name).write_bytes(data[: len(data) // 2])
    reader = load_split(folder, "train")
    reader.batch(torch.arange(3))  # shard 0 is whole
    with pytest.raises(ShardError, match=rf"{name}: truncated shard \(\d+ bytes, its records need \d+\)") as caught:
        reader.batch(torch.arange(len(reader)))
    assert "\n" not in str(caught.value)


def test_a_missing_shard_or_index_is_named_in_one_line(shards: Path, tmp_path: Path) -> None:
    folder, name = _copy(shards, tmp_path)
    (folder / name).unlink()
    with pytest.raises(ShardError, match=rf"{name}: shard file listed in dataset.json is missing"):
        load_split(folder, "train").batch(torch.arange(len(load_split(folder, "train"))))
    index = name.replace(".tar", ".idx")
    shutil.copy(shards / name, folder / name)
    (folder / index).write_bytes(b"not an index")
    with pytest.raises(ShardError, match=rf"{index}: not a record index"):
        load_split(folder, "train").batch(torch.arange(len(load_split(folder, "train"))))


def test_an_ingest_folder_without_a_record_index_is_refused(shards: Path, tmp_path: Path) -> None:
    import json

    folder, _ = _copy(shards, tmp_path)
    info = json.loads((folder / "dataset.json").read_text())
    del info["index"]
    (folder / "dataset.json").write_text(json.dumps(info))
    with pytest.raises(ShardError, match="no aligntok-index/1 record index.*rerun `aligntok ingest`"):
        load_split(folder, "train")


class _Counting(http.server.SimpleHTTPRequestHandler):
    requests: list[str] = []

    def do_GET(self) -> None:
        type(self).requests.append(self.path)
        super().do_GET()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def served(shards: Path) -> Iterator[tuple[str, list[str]]]:
    requests: list[str] = []
    handler = type("Handler", (_Counting,), {"requests": requests})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(shards)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", requests
    finally:
        server.shutdown()
        server.server_close()


def test_remote_shards_are_fetched_once_into_the_cache_and_read_like_local_ones(
        served: tuple[str, list[str]], shards: Path, tmp_path: Path) -> None:
    url, requests = served
    local = load_split(shards, "train")
    remote = ShardReader(url, "train", cache_dir=tmp_path / "cache")
    everything = torch.arange(len(local))
    assert torch.equal(remote.batch(everything)[0], local.batch(everything)[0])
    assert remote.keys == local.keys
    fetched = sorted(path for path in requests if path.endswith((".tar", ".idx")))
    assert len(fetched) == 2 * len(local.names) == len(set(fetched))  # every shard and index once
    requests.clear()
    again = ShardReader(url, "train", cache_dir=tmp_path / "cache")
    assert torch.equal(again.batch(everything)[0], local.batch(everything)[0])
    assert requests == ["/dataset.json"]  # read fresh; the shards come from the cache


def test_an_unreachable_remote_folder_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(Exception, match=r"http://127\.0\.0\.1:9/data/dataset\.json") as caught:
        ShardReader("http://127.0.0.1:9/data", "train", cache_dir=tmp_path)
    assert "\n" not in str(caught.value)


def test_starting_the_loader_leaves_the_global_generator_alone(shards: Path) -> None:
    torch.manual_seed(11)
    expected = torch.rand(3)
    torch.manual_seed(11)
    for workers in (0, 2):
        batches = StepBatches(load_split(shards, "train"), BATCH, SEED, steps=3, workers=workers)
        batches(1)
        batches.close()
    assert torch.equal(torch.rand(3), expected)  # the training loop's checkpointed RNG state stays exact
