"""Promotions of one model are serialised: concurrent promotions in several processes leave one consistent chain
of champions, and a promotion that waits too long fails naming the holder (a real SQLite registry)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import uuid
from pathlib import Path

import pytest

from aligntok.ops.promote import LOCK_DIR_ENV, PromotionError, lock_path, promote, promotion_lock

from test_promote import GOOD, config_for, version

PROCESSES = 3


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory):
    import mlflow

    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.setenv(LOCK_DIR_ENV, str(root / "locks"))
        client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
        client.search_registered_models()  # creates the database's tables before any process starts
        yield client


@pytest.fixture
def model(registry) -> str:
    name = f"aligntok-tokenizer-{uuid.uuid4().hex[:8]}"
    registry.create_registered_model(name)
    return name


PROMOTER = textwrap.dedent("""
    import sys
    import mlflow
    from aligntok.config import PromoteConfig
    from aligntok.ops.promote import promote

    uri, model, candidate = sys.argv[1:]
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.get_registered_model(model)  # imported, connected and warm before the start
    default = PromoteConfig()
    config = default.model_copy(update={"models": {model: default.models["aligntok-tokenizer"]}})
    print("ready", flush=True)
    sys.stdin.readline()
    print(promote(model, candidate, config, mlflow_client=client, reason=f"race {candidate}").message)
""")
"""One promotion in a process of its own, started when the parent says go."""


def promote_at_once(uri: str, model: str, candidates: list[str]) -> list[str]:
    """Promote each candidate in its own process, all started at the same moment; their outputs."""
    processes = [subprocess.Popen([sys.executable, "-c", PROMOTER, uri, model, candidate], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for candidate in candidates]
    try:
        for process in processes:
            assert process.stdout.readline().strip() == "ready", process.stderr.read()
        for process in processes:  # the barrier: each is waiting for this line
            process.stdin.write("go\n")
            process.stdin.flush()
        outputs = [process.communicate(timeout=120) for process in processes]
    finally:
        for process in processes:
            process.kill()
    assert [process.returncode for process in processes] == [0] * len(processes), [err for _, err in outputs]
    return [out for out, _ in outputs]


def test_concurrent_promotions_leave_one_consistent_chain(registry, model) -> None:
    first = version(registry, model, **GOOD)
    promote(model, first, config_for(model), mlflow_client=registry)
    candidates = [version(registry, model, **GOOD) for _ in range(PROCESSES)]  # equal figures: every one passes
    promote_at_once(registry.tracking_uri, model, candidates)

    tags = {v: registry.get_model_version(model, v).tags for v in [first, *candidates]}
    assert all(tags[v]["promotion.decision"] == "promoted" for v in candidates)
    against = {v: tags[v]["promotion.against"] for v in candidates}
    # each promotion displaced a different champion: none read a champion that another had already replaced
    assert len(set(against.values())) == PROCESSES, f"two promotions displaced the same champion: {against}"
    chain, successor = [first], {displaced: v for v, displaced in against.items()}
    while chain[-1] in successor:
        chain.append(successor[chain[-1]])
    assert sorted(chain[1:]) == sorted(candidates), f"the chain {chain} misses a promotion ({against})"
    champion = str(registry.get_model_version_by_alias(model, "champion").version)
    previous = str(registry.get_model_version_by_alias(model, "previous").version)
    assert (champion, previous) == (chain[-1], chain[-2])
    for displaced, successor_version in zip(chain, chain[1:]):
        assert tags[displaced]["promotion.superseded_by"] == successor_version
        assert f"(was v{displaced}, now @previous" in tags[successor_version]["promotion.message"]
        history = json.loads(tags[successor_version]["promotion.history"])
        assert [(h["decision"], h["against"]) for h in history] == [("promoted", displaced)]
    assert list((Path(os.environ[LOCK_DIR_ENV])).iterdir()) == []  # every lock released (and removed)


def test_a_promotion_waits_for_the_holder_then_fails_naming_it(registry, model) -> None:
    first = version(registry, model, **GOOD)
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with promotion_lock(registry, model, f"promote {model} 99"):
            held.set()
            release.wait(10)

    thread = threading.Thread(target=hold)
    thread.start()
    assert held.wait(10)
    path = lock_path(registry.tracking_uri, model)
    assert path.parent == Path(os.environ[LOCK_DIR_ENV]) and path.is_file()
    try:
        with pytest.raises(PromotionError) as busy:
            promote(model, first, config_for(model), mlflow_client=registry, lock_timeout=0.3)
        message = str(busy.value)
        assert "\n" not in message
        assert message.startswith(f"{model}: another promotion holds the registry (promote {model} 99: pid {os.getpid()}")
        assert f"gave up after waiting 0.3 s (lock {path})" in message
        other = f"{model}-other"
        registry.create_registered_model(other)
        assert lock_path(registry.tracking_uri, other) != path
        with promotion_lock(registry, other, "promote other"):  # another model's promotions do not wait
            pass
    finally:
        release.set()
        thread.join()
    assert promote(model, first, config_for(model), mlflow_client=registry, lock_timeout=0.3).outcome == "promoted"
    assert not path.exists()
