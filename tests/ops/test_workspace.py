"""Run workspaces on a small real git + DVC project: a worktree per deployment sharing the DVC cache, run
commits on a run branch, pushes to a local DVC remote and a bare git remote, and a fresh clone of the run
commit that finds `dvc repro` a no-op. The deployed checkout is never written to."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from aligntok.ops import workspace as ws

from support.servers import TELEMETRY_OFF

PROJECT = {
    "count.py": "import json, pathlib, yaml\n"
                "n = yaml.safe_load(open('params.yaml'))['n']\n"
                "pathlib.Path('out').mkdir(exist_ok=True)\n"
                "pathlib.Path('out/n.txt').write_text(str(n) * 1000)\n"
                "pathlib.Path('metrics.json').write_text(json.dumps({'n': n}))\n",
    "dvc.yaml": "stages:\n  count:\n    cmd: python count.py\n    deps: [count.py]\n    params: [n]\n"
                "    outs: [out]\n    metrics:\n      - metrics.json:\n          cache: false\n",
    "params.yaml": "n: 1\n",
}


def sh(cwd: Path, *command: str) -> str:
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(command)}: {done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(autouse=True)
def _tools(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in TELEMETRY_OFF.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    for key, value in {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com", "GIT_COMMITTER_NAME": "t",
                       "GIT_COMMITTER_EMAIL": "t@example.com"}.items():
        monkeypatch.setenv(key, value)


@pytest.fixture
def deployed(tmp_path: Path) -> Path:
    """A bare `origin`, and a checkout of it (the deployed one) with a local DVC remote, run once by hand."""
    origin, checkout = tmp_path / "origin.git", tmp_path / "checkout"
    sh(tmp_path, "git", "init", "-q", "--bare", "-b", "main", str(origin))
    checkout.mkdir()
    sh(checkout, "git", "init", "-q", "-b", "main")
    for name, text in PROJECT.items():
        (checkout / name).write_text(text)
    sh(checkout, "dvc", "init", "-q")
    sh(checkout, "dvc", "remote", "add", "-d", "store", str(tmp_path / "dvc-store"))
    sh(checkout, "dvc", "repro", "-q")
    (checkout / ".gitignore").unlink()  # DVC's entry for `out`: committed by runs only, not by the ref
    sh(checkout, "git", "add", "-A", "--", ".", ":!out")
    sh(checkout, "git", "commit", "-qm", "project")
    sh(checkout, "git", "remote", "add", "origin", str(origin))
    sh(checkout, "git", "push", "-q", "origin", "main")
    return checkout


def test_a_run_works_apart_commits_pushes_and_a_clone_of_its_commit_reproduces_as_a_no_op(deployed: Path,
                                                                                        tmp_path: Path) -> None:
    before = sh(deployed, "git", "status", "--porcelain")
    work = ws.prepare(deployed, "nightly")
    assert work.path == deployed / ws.WORKSPACES / "nightly" and work.previous is None
    assert (work.path / "dvc.lock").read_text() == (deployed / "dvc.lock").read_text()
    assert ws.restore_outputs(work) == "pulled from DVC remote store"
    assert (work.path / "out" / "n.txt").read_text() == "1" * 1000  # from the remote (nothing pushed yet: cache)
    # the run: a preset applied in the workspace, not in the checkout
    (work.path / "params.yaml").write_text("n: 2\n")
    sh(work.path, "dvc", "repro", "-q")
    commit = ws.commit_run(work, "aligntok run test: count ran")
    pushed = ws.push(work, "origin")
    assert pushed[0] == "outputs pushed to DVC remote store" and "pushed to git remote origin" in pushed[1]
    # the checkout is untouched, the branch is in its repository and in origin
    assert sh(deployed, "git", "status", "--porcelain") == before
    assert (deployed / "params.yaml").read_text() == "n: 1\n" and (deployed / "out" / "n.txt").read_text() == "1" * 1000
    assert sh(deployed, "git", "rev-parse", work.branch).strip() == commit
    assert sh(tmp_path / "origin.git", "git", "rev-parse", work.branch).strip() == commit
    assert sh(deployed, "git", "show", f"{commit}:params.yaml") == "n: 2\n"
    assert '"n": 2' in sh(deployed, "git", "show", f"{commit}:metrics.json")
    assert sh(work.path, "git", "status", "--porcelain") == ""  # the workspace sits at its run commit
    # a fresh clone at the run commit: dvc pull, then nothing to reproduce
    clone = tmp_path / "clone"
    sh(tmp_path, "git", "clone", "-q", str(tmp_path / "origin.git"), str(clone))
    sh(clone, "git", "checkout", "-q", commit)
    sh(clone, "dvc", "pull", "-q")
    assert (clone / "out" / "n.txt").read_text() == "2" * 1000
    assert "Running stage" not in sh(clone, "dvc", "repro")
    assert sh(clone, "git", "status", "--porcelain") == ""


def test_the_next_run_starts_from_the_last_results_and_the_branch_keeps_every_run(deployed: Path) -> None:
    first = ws.prepare(deployed, "nightly")
    (first.path / "params.yaml").write_text("n: 2\n")
    sh(first.path, "dvc", "repro", "-q")
    one = ws.commit_run(first, "run one")
    # a killed run: half-written files in the workspace, no commit
    (first.path / "dvc.lock").write_text("garbage: [")
    second = ws.prepare(deployed, "nightly")
    assert second.previous == one and second.commit == first.commit
    assert (second.path / "dvc.lock").read_text() == sh(deployed, "git", "show", f"{one}:dvc.lock")
    assert '"n": 2' in (second.path / "metrics.json").read_text()
    assert (second.path / ".gitignore").read_text() == "/out\n"  # DVC's entry, which the ref lacks
    (second.path / "params.yaml").write_text("n: 2\n")  # the same preset again
    assert "Running stage" not in sh(second.path, "dvc", "repro")  # nothing changed since run one
    two = ws.commit_run(second, "run two")
    assert sh(deployed, "git", "rev-list", "--parents", "-n", "1", two).split() == [two, second.commit, one]
    # another deployment coexists, at its own ref, with its own branch
    other = ws.prepare(deployed, "on-demand", ref=first.commit)
    assert other.path != second.path and other.previous is None and other.branch == "aligntok-runs/on-demand"


def test_the_branch_moves_only_from_the_commit_a_run_started_from(deployed: Path) -> None:
    first = ws.prepare(deployed, "nightly")
    late = ws.Workspace(first.checkout, first.path, first.name, first.ref, first.commit, first.previous)
    ws.commit_run(first, "run one")
    with pytest.raises(ws.WorkspaceError, match="update-ref"):
        ws.commit_run(late, "a run that started before run one was committed")


def test_bad_names_refs_and_folders_are_refused_naming_them(deployed: Path) -> None:
    with pytest.raises(ws.WorkspaceError, match=r"ref 'no-such-branch' names no commit"):
        ws.prepare(deployed, "nightly", ref="no-such-branch")
    with pytest.raises(ws.WorkspaceError, match=r"workspace name '\.\./x'"):
        ws.prepare(deployed, "../x")
    squatter = deployed / ws.WORKSPACES / "taken"
    squatter.mkdir(parents=True)
    with pytest.raises(ws.WorkspaceError, match="exists but is not a git worktree"):
        ws.prepare(deployed, "taken")


def test_without_remotes_the_run_stays_local_and_says_so(deployed: Path) -> None:
    sh(deployed, "dvc", "remote", "remove", "store")
    sh(deployed, "git", "add", "-A")
    sh(deployed, "git", "commit", "-qm", "no remote")
    work = ws.prepare(deployed, "nightly")
    assert ws.restore_outputs(work) == "checked out from the shared DVC cache"
    assert (work.path / "out" / "n.txt").read_text() == "1" * 1000  # the checkout's cache is shared
    ws.commit_run(work, "local run")
    assert ws.push(work, "upstream") == ["outputs not pushed: no DVC default remote (dvc remote add -d ...)",
                                         "aligntok-runs/nightly not pushed: the checkout has no git remote 'upstream'"]
