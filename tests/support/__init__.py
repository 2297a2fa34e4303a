"""Helpers shared by the tests, imported as `support.<module>` (tests/ is on sys.path through conftest.py):

- `paths`: `REPO` (the checkout) and `IMAGENET_SAMPLE` (the shared real-image folder)
- `tiny`: the tiny model, the quick stage 1, the `one_thread` fixture, `make_inputs`
- `shards`: small datasets in the ingest contract format and the `edit_*` helpers that break them
- `corpus`: image folders of awkward and hostile inputs for ingest
- `ranks`: a function run as N gloo ranks in spawned processes
- `servers`: real servers (PostgreSQL, MLflow, S3, Prefect, HTTP) on loopback ports
"""
