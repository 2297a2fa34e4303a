"""The latent cache on a tiny dataset and tokenizer: contents, statistics, resume, rank split,
the one normalisation point, and the mapped latent batch loader (bit for bit the old in-memory one)."""

from __future__ import annotations

import dataclasses
import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from aligntok.config import CacheLatentsConfig, EncoderConfig, Params, parse_params
from aligntok.data.loader import load_split
from aligntok.data.shards import INDEX_FORMAT
from aligntok.diffusion.latent_writer import CacheSummary, cache_latents, rank_shards
from aligntok.diffusion.latents import STATS, LatentNormalizer, LatentSet, load_latents, read_stats, shard_name
from aligntok.distributed import dist_info
from aligntok.encoder import export_encoder
from aligntok.errors import AligntokError
from aligntok.tokenizer.api import Tokenizer
from aligntok.tokenizer.stages import StagePaths, run_tokenizer_stage

from support.tiny import QUICK_STAGE1, TINY_MODEL, one_thread  # noqa: F401 (fixture)
from support.ranks import spawn_ranks
from support.shards import edit_meta, write_dataset

TINY = {
    **TINY_MODEL,
    "align_latent": QUICK_STAGE1,
}
CFG = CacheLatentsConfig(max_images=None, batch_size=3, shard_size=5)
"""24 train records -> shards of 5, 5, 5, 5, 4 (the second one crosses a tar boundary)."""
SHARDS = [shard_name(i) for i in range(5)]


pytestmark = pytest.mark.usefixtures("one_thread")  # see support.tiny.one_thread


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny ingest folder and a 2-step stage-1 tokenizer (no registry)."""
    root = tmp_path_factory.mktemp("latents")
    params: Params = parse_params(TINY)
    data = write_dataset(root / "data")
    export_encoder(EncoderConfig(**TINY["encoder"]), root / "encoder")
    paths = StagePaths(data=data, encoder=root / "encoder", out=root / "tokenizer", checkpoints=root / "ckpt")
    run_tokenizer_stage("align_latent", params, paths, register=False, progress=False)
    return {"root": root, "data": data, "tokenizer": root / "tokenizer"}


@pytest.fixture(scope="module")
def cache(setup: dict[str, Path]) -> Path:
    """The single-process cache, written once."""
    out = setup["root"] / "cache"
    summary = cache_latents(setup["tokenizer"], setup["data"], out, CFG, progress=False)
    assert summary.encoded == [0, 1, 2, 3, 4] and summary.stats_written and summary.images_per_s > 0
    return out


@pytest.fixture(scope="module")
def tokenizer(setup: dict[str, Path]) -> Tokenizer:
    return Tokenizer.load(setup["tokenizer"])


def shard_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """All shards concatenated: latent, latent_flip (N, C, h, w), label (N,)."""
    shards = [load_file(str(folder / name)) for name in SHARDS]
    return {key: torch.cat([s[key] for s in shards]) for key in ("latent", "latent_flip", "label")}


def same_shard(a: Path, b: Path) -> bool:
    """Equal tensors and metadata (the file bytes can differ: safetensors orders metadata keys freely)."""
    with safe_open(str(a), framework="pt") as fa, safe_open(str(b), framework="pt") as fb:
        if fa.metadata() != fb.metadata() or set(fa.keys()) != set(fb.keys()):
            return False
        return all(torch.equal(fa.get_tensor(k), fb.get_tensor(k)) for k in fa.keys())


def copy_cache(cache: Path, to: Path) -> Path:
    shutil.copytree(cache, to)
    return to


def test_cache_holds_every_image_and_its_flip_with_channel_stats(
        cache: Path, setup: dict[str, Path], tokenizer: Tokenizer) -> None:
    assert sorted(p.name for p in cache.iterdir()) == sorted([*SHARDS, STATS])
    train = load_split(setup["data"], "train")
    images, labels = train.batch(torch.arange(len(train)))  # (24, 3, 16, 16)
    cached = shard_tensors(cache)
    assert cached["latent"].shape == cached["latent_flip"].shape == (24, 4, 4, 4)
    assert cached["latent"].dtype == torch.float32 and cached["label"].dtype == torch.int64
    assert torch.equal(cached["label"], labels)
    assert torch.allclose(cached["latent"], tokenizer.encode(images), atol=1e-5)
    assert torch.allclose(cached["latent_flip"], tokenizer.encode(torch.flip(images, dims=[-1])), atol=1e-5)
    assert not torch.allclose(cached["latent"], cached["latent_flip"], atol=1e-3)  # noise is not symmetric

    stats = read_stats(cache)
    both = torch.cat([cached["latent"], cached["latent_flip"]]).transpose(0, 1).reshape(4, -1)  # (C, 2N·h·w)
    assert torch.allclose(torch.tensor(stats["mean"]), both.mean(dim=1), atol=1e-5)
    assert torch.allclose(torch.tensor(stats["std"]), both.std(dim=1), atol=1e-5)
    assert stats["count"] == 48 and stats["images"] == 24 and stats["latent_shape"] == [4, 4, 4]
    assert stats["num_classes"] == 3 and stats["classes"] == ["tshirt", "trouser", "pullover"]
    assert stats["shards"] == SHARDS and stats["tokenizer"] == str(setup["tokenizer"])
    meta = json.loads((setup["data"] / "dataset.json").read_text())
    assert meta["counts"]["train"] == 24


def test_rerun_after_a_killed_run_redoes_only_the_unfinished_shards(
        cache: Path, setup: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = copy_cache(cache, tmp_path / "cache")
    (out / SHARDS[1]).unlink()  # never written
    (out / SHARDS[3]).write_bytes((cache / SHARDS[3]).read_bytes()[:100])  # torn (a non-atomic writer)
    (out / STATS).unlink()
    (out / f".{SHARDS[1]}.tmp-12345").write_bytes(b"half")  # a killed run's temporary
    kept = {name: (out / name).stat().st_mtime_ns for name in (SHARDS[0], SHARDS[2], SHARDS[4])}
    calls = []
    encode = Tokenizer.encode
    monkeypatch.setattr(Tokenizer, "encode", lambda self, x: calls.append(len(x)) or encode(self, x))

    summary = cache_latents(setup["tokenizer"], setup["data"], out, CFG, progress=False)
    assert summary.encoded == [1, 3] and summary.skipped == [0, 2, 4] and summary.encoded_images == 10
    assert calls == [3, 3, 2, 2] * 2  # two shards of 5, batches of 3: plain and flipped
    assert {name: (out / name).stat().st_mtime_ns for name in kept} == kept
    assert sorted(p.name for p in out.iterdir()) == sorted([*SHARDS, STATS])
    assert all(same_shard(out / name, cache / name) for name in SHARDS)
    assert (out / STATS).read_text() == (cache / STATS).read_text()

    calls.clear()
    again = cache_latents(setup["tokenizer"], setup["data"], out, CFG, progress=False)
    assert again.encoded == [] and calls == [] and again.stats_written


def test_fewer_images_re_encode_the_changed_shard_and_remove_stale_ones(
        cache: Path, setup: dict[str, Path], tmp_path: Path) -> None:
    out = copy_cache(cache, tmp_path / "cache")
    cfg = CacheLatentsConfig(max_images=13, batch_size=3, shard_size=5)
    summary = cache_latents(setup["tokenizer"], setup["data"], out, cfg, progress=False)
    assert summary.skipped == [0, 1] and summary.encoded == [2]  # shard 2 now holds 3 records, not 5
    assert summary.removed == [SHARDS[3], SHARDS[4]]
    assert sorted(p.name for p in out.iterdir()) == sorted([*SHARDS[:3], STATS])
    latents = load_latents(out)
    full = shard_tensors(cache)
    assert len(latents) == 13 and read_stats(out)["count"] == 26
    assert torch.equal(mapped(latents, "latent"), full["latent"][:13])
    assert torch.equal(latents.labels(), full["label"][:13])


def _cache_as_a_rank(tokenizer: Path, data: Path, out: Path) -> CacheSummary:
    return cache_latents(tokenizer, data, out, CFG, progress=False)


def test_two_ranks_encode_contiguous_shards_and_equal_the_single_process_cache(
        cache: Path, setup: dict[str, Path], tmp_path: Path) -> None:
    """Two gloo processes: rank 0 encodes shards 0-1, rank 1 shards 2-4; rank 0 merges the per-shard statistics
    in shard order: every shard and stats.json are byte-identical to the one-process cache."""
    out = tmp_path / "cache"
    summaries = spawn_ranks(_cache_as_a_rank, 2, setup["tokenizer"], setup["data"], out)
    assert [s.encoded for s in summaries] == [[0, 1], [2, 3, 4]]
    assert [s.stats_written for s in summaries] == [True, False]  # only rank 0 writes stats
    assert all(same_shard(out / name, cache / name) for name in SHARDS)
    assert (out / STATS).read_bytes() == (cache / STATS).read_bytes()
    # resumed at one process: every shard is complete, the statistics come out the same
    again = cache_latents(setup["tokenizer"], setup["data"], out, CFG, progress=False)
    assert again.encoded == [] and again.skipped == [0, 1, 2, 3, 4]
    assert (out / STATS).read_bytes() == (cache / STATS).read_bytes()


def test_a_rank_reads_only_the_ingest_shards_that_hold_its_records(setup: dict[str, Path],
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import aligntok.diffusion.latent_writer as latents_module
    from aligntok.data.loader import iter_shard
    from aligntok.data.reader import read_dataset_info

    info = read_dataset_info(setup["data"])  # 24 train records in two tars of 12
    opened: list[str] = []

    def recording(path: Path):  # the real reader, noting which tar it opened
        opened.append(Path(path).name)
        return iter_shard(path)

    monkeypatch.setattr(latents_module, "iter_shard", recording)
    everything = list(latents_module._records(setup["data"], info, 0, 24))
    assert opened == ["train-000000.tar", "train-000001.tar"]
    for first, stop, tars in ((0, 10, ["train-000000.tar"]), (12, 24, ["train-000001.tar"]),
                              (10, 15, ["train-000000.tar", "train-000001.tar"])):
        opened.clear()
        assert list(latents_module._records(setup["data"], info, first, stop)) == everything[first:stop]
        assert opened == tars
    assert [rank_shards(5, r, 2) for r in (0, 1)] == [range(0, 2), range(2, 5)]
    assert [len(rank_shards(3, r, 4)) for r in range(4)] == [0, 1, 1, 1]  # more ranks than shards: some idle
    with pytest.raises(AligntokError, match="rank 4 is outside world size 4"):
        rank_shards(5, 4, 4)


def test_dist_info_reads_torchrun_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert dist_info() == (0, 1, 0)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert dist_info() == (3, 4, 1)


def test_normaliser_round_trip_and_normalised_cache_statistics(cache: Path, tokenizer: Tokenizer) -> None:
    normalizer = LatentNormalizer.load(cache / STATS)
    cached = shard_tensors(cache)
    z = cached["latent"][:6]  # (6, C, h, w)
    assert torch.allclose(normalizer.denormalise(normalizer.normalise(z)), z, atol=1e-5)
    assert torch.allclose(tokenizer.decode(normalizer.denormalise(normalizer.normalise(z))),
                          tokenizer.decode(z), atol=1e-5)
    # the diffusion decode path de-normalises: it must equal decoding the raw latent
    assert torch.allclose(normalizer.decode(tokenizer, normalizer.normalise(z)), tokenizer.decode(z), atol=1e-5)
    assert not torch.allclose(tokenizer.decode(normalizer.normalise(z)), tokenizer.decode(z), atol=1e-3)

    both = normalizer.normalise(torch.cat([cached["latent"], cached["latent_flip"]]))  # (2N, C, h, w)
    per_channel = both.transpose(0, 1).reshape(4, -1)
    assert torch.allclose(per_channel.mean(dim=1), torch.zeros(4), atol=1e-5)
    assert torch.allclose(per_channel.std(dim=1), torch.ones(4), atol=1e-5)
    with pytest.raises(ValueError, match=r"\(B, 4, h, w\)"):
        normalizer.normalise(torch.zeros(2, 3, 4, 4))


def mapped(latents: LatentSet, name: str) -> torch.Tensor:
    """One tensor of every shard, concatenated from the set's maps (a test helper: training never does this)."""
    return torch.from_numpy(np.concatenate([latents.views(s)[name] for s in range(len(latents.shards))]))


def owners(latents: LatentSet, z: torch.Tensor) -> list[tuple[int, bool]]:
    """For each normalised row of z: (record index, flipped?) it was taken from."""
    plain = latents.normalizer.normalise(mapped(latents, "latent"))
    flip = latents.normalizer.normalise(mapped(latents, "latent_flip"))
    found = []
    for row in z:
        matches = [(i, False) for i in range(len(latents)) if torch.equal(row, plain[i])]
        matches += [(i, True) for i in range(len(latents)) if torch.equal(row, flip[i])]
        assert len(matches) == 1
        found.append(matches[0])
    return found


def test_loader_draws_views_per_sample_and_splits_a_step_over_ranks(cache: Path) -> None:
    latents = load_latents(cache)
    assert len(latents) == 24 and latents.latent_shape == (4, 4, 4) and latents.classes[0] == "tshirt"
    indices = torch.arange(24)
    z, y = latents.batch(indices, torch.Generator().manual_seed(0))
    assert z.shape == (24, 4, 4, 4) and torch.equal(y, latents.labels())
    views = owners(latents, z)
    assert [i for i, _ in views] == list(range(24))
    assert {flipped for _, flipped in views} == {False, True}  # per sample, not per batch
    z_again, _ = latents.batch(indices, torch.Generator().manual_seed(0))
    assert torch.equal(z, z_again)

    z8, y8 = latents.batch_for_step(step=5, batch_size=8, seed=1)
    z8b, y8b = latents.batch_for_step(step=5, batch_size=8, seed=1)
    assert z8.shape == (8, 4, 4, 4) and torch.equal(z8, z8b) and torch.equal(y8, y8b)
    assert not torch.equal(latents.batch_for_step(step=6, batch_size=8, seed=1)[0], z8)
    parts = [latents.batch_for_step(step=5, batch_size=8, seed=1, rank=r, world_size=2) for r in (0, 1)]
    assert all(p[0].shape == (4, 4, 4, 4) for p in parts)
    assert torch.equal(torch.cat([p[0] for p in parts]), z8) and torch.equal(torch.cat([p[1] for p in parts]), y8)
    mine = {i for i, _ in owners(latents, parts[0][0])}
    theirs = {i for i, _ in owners(latents, parts[1][0])}
    assert len(mine) == len(theirs) == 4 and not mine & theirs
    with pytest.raises(ValueError, match="split evenly"):
        latents.batch_for_step(step=0, batch_size=7, seed=1, rank=0, world_size=2)


def test_clear_errors_for_missing_inputs(setup: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(AligntokError, match="ingest folder not found"):
        cache_latents(setup["tokenizer"], tmp_path / "nowhere", tmp_path / "out", CFG, progress=False)
    (tmp_path / "bare").mkdir()
    with pytest.raises(AligntokError, match="dataset.json: not found"):
        cache_latents(setup["tokenizer"], tmp_path / "bare", tmp_path / "out", CFG, progress=False)
    empty = shutil.copytree(setup["data"], tmp_path / "empty")
    edit_meta(empty, lambda meta: (meta["shards"].update(train=[]), meta["counts"].update(train=0)))
    with pytest.raises(AligntokError, match="train split is empty"):
        cache_latents(setup["tokenizer"], empty, tmp_path / "out", CFG, progress=False)
    with pytest.raises(AligntokError, match="not a tokenizer folder"):
        cache_latents(tmp_path / "no-tokenizer", setup["data"], tmp_path / "out", CFG, progress=False)
    with pytest.raises(AligntokError, match="latent cache folder not found"):
        load_latents(tmp_path / "no-cache")
    with pytest.raises(AligntokError, match="stats.json: latent statistics not found"):
        load_latents(tmp_path / "bare")


# ---------------------------------------------------------------------------- the mapped cache


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and bytes (torch.equal calls -0.0 and 0.0 equal, and NaN unequal to itself)."""
    return a.dtype == b.dtype and a.shape == b.shape and bool((a.view(torch.uint8) == b.view(torch.uint8)).all())


class InMemoryCache:
    """What `load_latents` did before the cache was mapped: every shard read and concatenated (`load_file`,
    `torch.cat`), batches gathered with `torch.where` over both views."""

    def __init__(self, folder: Path) -> None:
        self.tensors = shard_tensors(folder)  # latent, latent_flip (N, C, h, w), label (N,)
        self.normalizer = LatentNormalizer.load(folder / STATS)

    def gather(self, indices: torch.Tensor, flips: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = torch.where(flips.view(-1, 1, 1, 1), self.tensors["latent_flip"][indices], self.tensors["latent"][indices])
        return self.normalizer.normalise(z), self.tensors["label"][indices]

    def batch_for_step(self, step: int, batch_size: int, seed: int, rank: int = 0,
                       world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        from aligntok.data.loader import batch_indices, step_generator

        indices = batch_indices(len(self.tensors["label"]), batch_size, seed, step)
        flips = torch.rand(batch_size, generator=step_generator(seed, step, "flip")) < 0.5
        part = slice(rank * batch_size // world_size, (rank + 1) * batch_size // world_size)
        return self.gather(indices[part], flips[part])


def test_the_mapped_cache_equals_the_in_memory_cache_bit_for_bit(cache: Path) -> None:
    latents, old = load_latents(cache), InMemoryCache(cache)
    assert [s.records for s in latents.shards] == [5, 5, 5, 5, 4] and latents.starts.tolist() == [0, 5, 10, 15, 20, 24]
    assert latents.starts.dtype == np.int64 and len(latents) == 24 and latents.latent_shape == (4, 4, 4)
    for name in ("latent", "latent_flip", "label"):
        assert same_bits(mapped(latents, name), old.tensors[name]), name
    assert same_bits(latents.labels(), old.tensors["label"]) and latents.num_classes == 3
    everything = torch.arange(24)
    for flips in (torch.zeros(24, dtype=torch.bool), torch.ones(24, dtype=torch.bool), torch.arange(24) % 3 == 0):
        for got, want in zip(latents.gather(everything, flips), old.gather(everything, flips)):
            assert same_bits(got, want)
    # out of order, across shards, repeated, negative (as torch indexes)
    indices, flips = torch.tensor([23, 0, 7, 7, 19, -1, 4, 5, 12]), torch.tensor([1, 0, 1, 0, 1, 1, 0, 0, 1]).bool()
    for got, want in zip(latents.gather(indices, flips), old.gather(indices, flips)):
        assert same_bits(got, want)
    empty = latents.gather(torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.bool))
    assert empty[0].shape == (0, 4, 4, 4) and empty[1].shape == (0,)
    for batch_size in (8, 24, 30):  # 30 > 24 records: drawn with replacement
        for step in range(6):
            whole = latents.batch_for_step(step, batch_size, seed=3)
            for got, want in zip(whole, old.batch_for_step(step, batch_size, seed=3)):
                assert same_bits(got, want), (batch_size, step)
            halves = [latents.batch_for_step(step, batch_size, seed=3, rank=r, world_size=2) for r in (0, 1)]
            for k in (0, 1):
                assert same_bits(torch.cat([h[k] for h in halves]), whole[k]), (batch_size, step)
    with pytest.raises(IndexError, match="index 24 is out of bounds for the 24 cached latents"):
        latents.gather(torch.tensor([3, 24]), torch.tensor([False, True]))


def test_a_batch_reads_the_maps_and_a_pickled_set_re_maps(cache: Path) -> None:
    latents = load_latents(cache)
    assert latents._maps == {}  # loading reads the headers only
    z, y = latents.batch_for_step(step=2, batch_size=4, seed=0)
    assert 1 <= len(latents._maps) <= 4  # only the shards this batch's rows lie in
    for shard, maps in latents._maps.items():
        assert set(maps) == {"latent", "latent_flip", "label"}
        for name, array in maps.items():
            assert isinstance(array, np.memmap) and not array.flags.writeable, name
            assert Path(array.filename) == cache / SHARDS[shard]
    assert maps["latent"].shape == (latents.shards[shard].records, 4, 4, 4)
    arrays = {k: v for k, v in vars(latents).items() if isinstance(v, (torch.Tensor, np.ndarray))}
    assert list(arrays) == ["starts"] and arrays["starts"].shape == (len(SHARDS) + 1,)  # nothing per record

    for shard in range(len(SHARDS)):
        latents.views(shard)
    blob = pickle.dumps(latents)
    assert len(blob) < len(pickle.dumps(load_latents(cache))) + 64  # no maps, nor their bytes, travel
    copy = pickle.loads(blob)
    assert copy._maps == {} and len(latents._maps) == len(SHARDS)
    z2, y2 = copy.batch_for_step(step=2, batch_size=4, seed=0)
    assert same_bits(z2, z) and same_bits(y2, y) and isinstance(next(iter(copy._maps.values()))["latent"], np.memmap)


def test_a_truncated_missing_or_mismatched_shard_is_one_line_naming_it(cache: Path, tmp_path: Path) -> None:
    def fails(folder: Path, match: str) -> None:
        with pytest.raises(AligntokError, match=match) as caught:
            load_latents(folder)
        assert "\n" not in str(caught.value)

    out = copy_cache(cache, tmp_path / "cache")
    shard = out / SHARDS[2]
    data = shard.read_bytes()
    shard.write_bytes(data[:-100])  # a torn copy: the header promises more bytes than the file holds
    fails(out, rf"{shard}: truncated shard \({len(data) - 100} bytes, its header needs {len(data)}\)")
    shard.write_bytes(data[:5])
    fails(out, rf"{shard}: not a readable latent shard \(5 bytes, shorter than the 8-byte header length\)")
    shard.write_bytes(data[:200])
    fails(out, rf"{shard}: not a readable latent shard \(its header length says \d+ bytes")
    shard.unlink()
    fails(out, rf"{shard}: listed in stats.json but missing; rerun `cache_latents`")

    shard.write_bytes(data)
    stats = json.loads((out / STATS).read_text())
    (out / STATS).write_text(json.dumps({**stats, "latent_shape": [8, 4, 4]}))
    fails(out, rf"{out / SHARDS[0]}: tensor 'latent' is F32 \[5, 4, 4, 4\], expected F32 \[5, 8, 4, 4\]")
    (out / STATS).write_text(json.dumps({**stats, "images": 25}))
    fails(out, r"shards hold 24 x \[4, 4, 4\], stats.json says 25")
    from aligntok.fileio import atomic_save_safetensors

    (out / STATS).write_text(json.dumps(stats))
    tensors = load_file(str(shard))
    atomic_save_safetensors({**tensors, "label": tensors["label"].int()}, shard, {"format": "aligntok-latents/1"})
    fails(out, rf"{shard}: tensor 'label' is I32 \[5\], expected I64 \[5\]")

    latents = load_latents(cache)  # a shard cut after loading: the map says so when first read
    moved = copy_cache(cache, tmp_path / "later")
    latents.shards[1] = dataclasses.replace(latents.shards[1], path=moved / SHARDS[1])
    (moved / SHARDS[1]).write_bytes((cache / SHARDS[1]).read_bytes()[:-10])
    with pytest.raises(AligntokError, match=rf"{moved / SHARDS[1]}: truncated shard"):
        latents.gather(torch.tensor([6]), torch.tensor([False]))


def test_the_open_file_limit_is_raised_to_map_every_shard(monkeypatch: pytest.MonkeyPatch,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    import resource

    from aligntok.diffusion.latents import SPARE_FILES, _allow_open_files

    limits = [(1024, 4096)]
    monkeypatch.setattr(resource, "getrlimit", lambda which: limits[-1])
    monkeypatch.setattr(resource, "setrlimit", lambda which, value: limits.append(value))
    _allow_open_files(1024 - SPARE_FILES)
    assert limits == [(1024, 4096)]  # fits: untouched
    _allow_open_files(1300)
    assert limits[-1] == (1300 + SPARE_FILES, 4096)
    limits[:] = [(1024, 2048)]
    with caplog.at_level("WARNING"):
        _allow_open_files(1300)
    assert limits[-1] == (2048, 2048) and "raise `ulimit -n`" in caplog.text


def test_the_ingest_record_index_replaces_counting_tar_headers(setup: dict[str, Path], tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import aligntok.diffusion.latent_writer as latents_module
    from aligntok.data.reader import read_dataset_info

    data = shutil.copytree(setup["data"], tmp_path / "data")
    everything = list(latents_module._records(data, read_dataset_info(data), 0, 24))  # counted from the tars
    edit_meta(data, lambda meta: meta.update(index={"format": INDEX_FORMAT, "records": {"train": [12, 12],
                                                                                         "val": [6]}}))

    def no_counting(path: Path) -> int:
        raise AssertionError(f"counted the records of {path}")

    monkeypatch.setattr(latents_module, "count_records", no_counting)
    info = read_dataset_info(data)
    assert list(latents_module._records(data, info, 0, 24)) == everything
    assert list(latents_module._records(data, info, 10, 15)) == everything[10:15]

    info["index"]["records"]["train"] = [11, 13]  # an index that disagrees with the tar it counts
    with pytest.raises(AligntokError, match=r"train-000000.tar: holds 12 records, the index in .*dataset.json "
                                            r"says 11; rerun `aligntok ingest`"):
        list(latents_module._records(data, info, 0, 24))
    info["index"]["records"]["train"] = [24]
    with pytest.raises(AligntokError, match=r"dataset.json: index.records.train is not one record count per train "
                                            r"shard \(2 shards\)"):
        list(latents_module._records(data, info, 0, 24))
    (data / "train-000001.tar").write_bytes((data / "train-000001.tar").read_bytes()[:700])
    info["index"]["records"]["train"] = [12, 12]
    with pytest.raises(AligntokError, match=r"train-000001.tar: damaged shard"):
        list(latents_module._records(data, info, 0, 24))
