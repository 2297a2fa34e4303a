"""One training loop for every stage: checkpointing, resume, EMA, clipping, NaN guard."""
