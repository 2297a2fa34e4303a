"""Data ingestion: image sources, per-image policy and WebDataset shard writing."""
