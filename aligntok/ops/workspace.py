"""Isolated, versioned pipeline runs: a git worktree per deployment, a run commit per result, pushed.

A scheduled or on-demand run never works in the checkout it was deployed from. `prepare` gives it a
workspace of its own, a git worktree of that checkout at a named ref (the checkout's branch by default),
under `.dvc/tmp/workspaces/<name>/`:

- it shares the checkout's DVC cache (`cache.dir` in the worktree's `.dvc/config.local`, beside a copy of
  the checkout's own local config: remote endpoints and credentials are per machine);
- it persists between runs of one deployment, so a killed run's training checkpoints (`checkpoints/`, not a
  DVC out) are there for the next run to resume;
- each run starts from the ref's committed files plus the results of the deployment's last run (its
  `dvc.lock` and the git-tracked metrics and plots, from the run branch): DVC then reruns only what the ref's
  code, the params or the source fingerprint changed, and restores the rest from its cache.

`commit_run` records the result as a commit on the run branch `aligntok-runs/<name>`: the ref's tree with
the run's `params.yaml`, `dvc.lock`, git-tracked metrics and the `.gitignore` entries DVC adds, its parents the ref's commit and the previous
run. `push` sends the outputs to the DVC remote, then the branch to the git remote, so that a clone of the
remote at that commit, after `dvc pull`, finds `dvc repro` a no-op.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from aligntok.ops.dag import git_tracked_outputs
from aligntok.errors import AligntokError

log = logging.getLogger(__name__)

WORKSPACES = Path(".dvc") / "tmp" / "workspaces"
"""Where a checkout's run workspaces live (git-ignored with the rest of `.dvc/tmp`)."""
RUN_BRANCH_PREFIX = "aligntok-runs/"
SOURCE_FINGERPRINT = Path("data") / "source.json"
"""The `snapshot` stage's output: what the run's `ingest` read."""
COMMITTER = {"GIT_AUTHOR_NAME": "aligntok pipeline", "GIT_AUTHOR_EMAIL": "pipeline@aligntok.invalid",
             "GIT_COMMITTER_NAME": "aligntok pipeline", "GIT_COMMITTER_EMAIL": "pipeline@aligntok.invalid"}
"""The identity of run commits where git has none configured."""
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


class WorkspaceError(AligntokError):
    """A workspace cannot be prepared, committed or pushed; the message names the git or DVC step."""


def git(cwd: Path, *args: str, env: dict[str, str] | None = None, check: bool = True) -> str:
    """Run git in `cwd` and return its stdout (stripped); a failure raises `WorkspaceError` with git's message."""
    done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, **(env or {})})
    if check and done.returncode:
        message = (done.stderr or done.stdout).strip().splitlines()
        raise WorkspaceError(f"{cwd}: git {' '.join(args)} failed: {message[-1] if message else done.returncode}")
    return done.stdout.strip()


def dvc(cwd: Path, *args: str) -> str:
    """Run `dvc` (from PATH, as DVC stages run `python`) in `cwd`; a failure raises `WorkspaceError`."""
    done = subprocess.run(["dvc", *args], cwd=cwd, capture_output=True, text=True)
    if done.returncode:
        lines = [line for line in (done.stderr + done.stdout).splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("ERROR")]
        raise WorkspaceError(f"{cwd}: dvc {' '.join(args)} failed: {(errors or lines or ['?'])[-1].strip()}")
    return done.stdout.strip()


def default_ref(checkout: Path) -> str:
    """The checkout's branch, or its commit when HEAD is detached."""
    branch = git(checkout, "symbolic-ref", "--quiet", "--short", "HEAD", check=False)
    return branch or git(checkout, "rev-parse", "HEAD")


def dirty_files(checkout: Path) -> list[str]:
    """Tracked files with uncommitted changes (a run uses the committed ref, not these)."""
    return [line[3:] for line in git(checkout, "status", "--porcelain", "--untracked-files=no").splitlines()]


@dataclass(frozen=True)
class Workspace:
    checkout: Path
    """The checkout the run was started from (never written to, but for its git objects and DVC cache)."""
    path: Path
    name: str
    ref: str
    commit: str
    """The ref's commit this run works at."""
    previous: str | None
    """The last run commit on the run branch, whose results this run starts from."""

    @property
    def branch(self) -> str:
        return RUN_BRANCH_PREFIX + self.name

    def source_fingerprint(self) -> str | None:
        """sha256 of the run's source fingerprint file, or None if the run did not write one."""
        path = self.path / SOURCE_FINGERPRINT
        return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def lock_file(checkout: Path, name: str) -> Path:
    """The lock of workspace `name` (beside it, so that resetting the workspace leaves it alone): runs of one
    deployment take turns. Its folder is created."""
    folder = Path(checkout).resolve() / WORKSPACES
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{name}.lock"


def prepare(checkout: Path, name: str, ref: str | None = None) -> Workspace:
    """The workspace `name` of `checkout`, at `ref`, holding the last run's results. Safe to call again.

    Files of the ref replace the workspace's tracked files (a killed run's half-written `dvc.lock`
    included); untracked ones (DVC outputs, checkpoints) stay for DVC and the stages to reuse."""
    checkout = Path(checkout).resolve()
    if not _NAME.match(name):
        raise WorkspaceError(f"workspace name {name!r}: use letters, digits, '.', '_' or '-'")
    ref = ref or default_ref(checkout)
    commit = git(checkout, "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}", check=False)
    if not commit:
        raise WorkspaceError(f"{checkout}: ref {ref!r} names no commit (a branch, tag or commit of this checkout)")
    path = checkout / WORKSPACES / name
    if (path / ".git").is_file():
        git(path, "checkout", "--quiet", "--force", "--detach", commit)
    elif path.exists():
        raise WorkspaceError(f"{path} exists but is not a git worktree of {checkout}: move it away")
    else:
        git(checkout, "worktree", "prune")
        path.parent.mkdir(parents=True, exist_ok=True)
        git(checkout, "worktree", "add", "--quiet", "--detach", str(path), commit)
        log.info("new workspace %s at %s (%s)", path, ref, commit[:12])
    _share_dvc_config(checkout, path)
    previous = git(checkout, "rev-parse", "--verify", "--quiet", f"refs/heads/{RUN_BRANCH_PREFIX}{name}",
                   check=False) or None
    if previous:
        _restore_results(path, previous)
    return Workspace(checkout, path, name, ref, commit, previous)


def _share_dvc_config(checkout: Path, path: Path) -> None:
    """The checkout's local DVC config (remote credentials), with the cache pointed at the checkout's cache."""
    cache = dvc(checkout, "cache", "dir")
    local = checkout / ".dvc" / "config.local"
    target = path / ".dvc" / "config.local"
    if local.is_file():
        shutil.copyfile(local, target)
    else:
        target.unlink(missing_ok=True)
    dvc(path, "config", "--local", "cache.dir", str(Path(cache).resolve()))


def _restore_results(path: Path, previous: str) -> None:
    """Check out the previous run's dvc.lock, git-tracked outputs and .gitignore files (those that list its
    outputs), as far as they exist in that commit."""
    files = git(path, "ls-tree", "-r", "--name-only", previous).splitlines()
    ignores = [p for p in files if p.rsplit("/", 1)[-1] == ".gitignore"]
    wanted = ["dvc.lock", *git_tracked_outputs(path / "dvc.yaml")]  # files, or folders (reports/plots)
    present = [p for p in wanted if any(f == p or f.startswith(p + "/") for f in files)] + ignores
    if present:
        git(path, "checkout", previous, "--", *present)


def restore_outputs(workspace: Workspace) -> str:
    """Put the outputs `dvc.lock` describes into the workspace: from the DVC remote if one is configured
    (`dvc pull`), else from the shared cache (`dvc checkout`). What is in neither is left to `dvc repro`."""
    remote = default_remote(workspace.path)
    if remote:
        dvc(workspace.path, "pull", "--allow-missing", "--quiet")
        return f"pulled from DVC remote {remote}"
    dvc(workspace.path, "checkout", "--allow-missing", "--quiet")
    return "checked out from the shared DVC cache"


def default_remote(path: Path) -> str | None:
    """The DVC default remote's name, or None if none is configured."""
    done = subprocess.run(["dvc", "remote", "default"], cwd=path, capture_output=True, text=True)
    name = done.stdout.strip()
    return name if done.returncode == 0 and name and "No default remote" not in name else None


def commit_run(workspace: Workspace, message: str) -> str:
    """Record the run's result (params.yaml, dvc.lock, git-tracked metrics and plots) as a commit on the run
    branch; returns its id. The branch moves only from the commit this run started from (a compare-and-swap),
    so a second writer fails instead of dropping a run."""
    path = workspace.path
    files = [p for p in ["params.yaml", "dvc.lock", *git_tracked_outputs(path / "dvc.yaml")] if (path / p).exists()]
    git(path, "add", "--all", "--", *files, ":(glob)**/.gitignore")  # DVC lists new outputs in .gitignore files
    tree = git(path, "write-tree")
    parents = [workspace.commit] + ([workspace.previous] if workspace.previous else [])
    identity = {} if git(path, "config", "user.email", check=False) else COMMITTER
    parent_args = [arg for parent in parents for arg in ("-p", parent)]
    commit = git(path, "commit-tree", tree, *parent_args, "-m", message, env=identity)
    git(path, "update-ref", "-m", "aligntok run", f"refs/heads/{workspace.branch}", commit,
        workspace.previous or "0" * 40)
    git(path, "reset", "--quiet", "--soft", commit)
    log.info("run commit %s on %s", commit[:12], workspace.branch)
    return commit


def git_remote_url(checkout: Path, remote: str) -> str | None:
    """The URL of the checkout's git remote `remote`, or None if it has no such remote."""
    return git(checkout, "remote", "get-url", remote, check=False) or None


def push(workspace: Workspace, git_remote: str | None) -> list[str]:
    """`dvc push` to the default DVC remote, then the run branch to `git_remote`; returns what was done.

    Outputs go first, so a pushed commit never names data the remote lacks. A missing remote is said, not
    an error (the run stays local); a failing push is a `WorkspaceError`."""
    done = []
    remote = default_remote(workspace.path)
    if remote:
        dvc(workspace.path, "push", "--quiet")
        done.append(f"outputs pushed to DVC remote {remote}")
    else:
        done.append("outputs not pushed: no DVC default remote (dvc remote add -d ...)")
    url = git_remote_url(workspace.checkout, git_remote) if git_remote else None
    if url:
        git(workspace.path, "push", "--quiet", git_remote, f"refs/heads/{workspace.branch}:refs/heads/{workspace.branch}")
        done.append(f"{workspace.branch} pushed to git remote {git_remote} ({url})")
    else:
        done.append(f"{workspace.branch} not pushed: the checkout has no git remote {git_remote!r}"
                    if git_remote else f"{workspace.branch} not pushed (no git remote asked for)")
    return done
