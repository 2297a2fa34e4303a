"""The `t2i_latents` stage: the captioned training images encoded by each tokenizer of `t2i.tokenizers`.

The same cache as `cache_latents` (`aligntok.diffusion.latent_writer`: shards of latents and their flips, the record
keys, per-channel stats; resumable, shardable over ranks), one folder per tokenizer, each over the first
`t2i.max_images` training records, so that every text-to-image model learns from the same images.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from aligntok.config import CacheLatentsConfig, Params
from aligntok.diffusion.latent_writer import CacheSummary, cache_latents
from aligntok.fileio import atomic_write_text

log = logging.getLogger(__name__)
SKIPPED = "skipped.json"


def cache_t2i_latents(params: Params, tokenizers: Path, data_dir: Path, out_dir: Path,
                      validation: Path | None = None, progress: bool = True) -> dict[str, CacheSummary]:
    """`cache_latents` for each tokenizer of `t2i.tokenizers` into `out_dir/<tokenizer>/`; a dataset whose training
    records have no captions (dataset.json `captions.train`) caches nothing and says so in `skipped.json`.
    `validation`: the validate stage's report, required to say success (None: not checked)."""
    from aligntok.data.reader import read_dataset_info

    out_dir.mkdir(parents=True, exist_ok=True)
    captioned = int((read_dataset_info(data_dir).get("captions") or {}).get("train", 0))
    if not captioned:
        reason = f"{data_dir}: no training record has a caption; the text-to-image stages skip"
        log.warning("t2i_latents: %s", reason)
        atomic_write_text(out_dir / SKIPPED, json.dumps({"skipped": reason}, indent=2) + "\n")
        return {}
    (out_dir / SKIPPED).unlink(missing_ok=True)
    done = {}
    for name in params.t2i.tokenizers:
        cfg = CacheLatentsConfig(tokenizer=name, max_images=params.t2i.max_images,
                                 batch_size=params.cache_latents.batch_size, shard_size=params.cache_latents.shard_size)
        done[name] = cache_latents(tokenizers / name, data_dir, out_dir / name, cfg, progress=progress,
                                   validation=validation, runtime=params.runtime)
    return done
