"""`aligntok.data.shards`: the one reader of the project's shards, shared by the loader and `validate`."""

from __future__ import annotations

from pathlib import Path

import pytest

from aligntok.data.loader import iter_shard
from aligntok.data.shards import NO_LABEL, index_shard, iter_records, record_image_key, record_label, shard_captions
from support.shards import write_shard


def test_records_are_grouped_by_key_in_stored_order(tmp_path: Path) -> None:
    path = tmp_path / "train-000000.tar"
    write_shard(path, [{"__key__": "b", "png": b"1", "cls": b"0"}, {"__key__": "a", "jpg": b"2", "cls": b" 7\n"}])
    records = list(iter_records(path))
    assert [(r["__key__"], r["__url__"]) for r in records] == [("b", "train-000000.tar"), ("a", "train-000000.tar")]
    assert [(record_image_key(r), record_label(r)) for r in records] == [("png", 0), ("jpg", 7)]
    assert list(iter_shard(path)) == [("b", b"1", 0), ("a", b"2", 7)]


def test_image_entry_order_and_errors() -> None:
    assert record_image_key({"jpeg": b"", "jpg": b"", "png": b""}) == "png"
    assert record_image_key({"jpeg": b"", "jpg": b""}) == "jpg"
    assert record_image_key({"jpeg": b""}) == "jpeg"
    with pytest.raises(ValueError, match=r"^no \.png/\.jpg member \(members: \['cls', 'webp'\]\)$"):
        record_image_key({"__key__": "k", "webp": b"", "cls": b"0"})
    with pytest.raises(ValueError, match=r"^no \.cls member$"):
        record_label({"png": b""})


def test_the_loader_names_the_shard_and_record(tmp_path: Path) -> None:
    path = tmp_path / "val-000000.tar"
    write_shard(path, [{"__key__": "k", "png": b"1"}])
    with pytest.raises(ValueError, match=r"val-000000.tar: record 'k': no \.cls member"):
        list(iter_shard(path))


def test_a_captioned_record_without_cls_has_no_label_and_keeps_its_caption(tmp_path: Path) -> None:
    path = tmp_path / "train-000000.tar"
    write_shard(path, [{"__key__": "a", "png": b"1", "txt": "a red dress".encode()},
                       {"__key__": "b", "png": b"2", "cls": b"3"},
                       {"__key__": "c", "png": b"3", "cls": b"1", "txt": "café".encode()}])
    assert [record_label(r) for r in iter_records(path)] == [NO_LABEL, 3, 1]
    assert index_shard(path)["label"].tolist() == [NO_LABEL, 3, 1]
    assert shard_captions(path) == {"a": "a red dress", "c": "café"}
    with pytest.raises(ValueError, match=r"^no \.cls member$"):
        record_label({"png": b""})  # neither a label nor a caption


def test_shard_captions_names_a_caption_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "val-000000.tar"
    write_shard(path, [{"__key__": "k", "png": b"1", "txt": b"caf\xe9"}])
    with pytest.raises(ValueError, match=r"val-000000.tar: record 'k': caption is not UTF-8"):
        shard_captions(path)
