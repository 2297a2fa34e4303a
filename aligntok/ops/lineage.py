"""Which source files a pipeline stage runs: the aligntok-internal import closure of its command.

`python -m aligntok <command>` runs `aligntok/__main__.py`, then `aligntok/cli.py` (its module-level
imports), then the command's handler, which imports the library modules the command runs lazily. Those
entry modules are declared here, in `STAGE_ENTRY` (command -> modules); the CLI computes a stage's
`code_digest` from it and the lineage test checks it against the handlers' own imports, so the library
never imports the CLI. `stage_code` follows imports statically with `ast` (nothing is imported): every
aligntok import of every module reached, at module level or inside functions, since a lazy import is code
the stage may run. Package `__init__.py` files count (importing `aligntok.a.b` runs them), and so does a
sibling file a module ships by name (`Path(__file__).with_name("pyfunc.py")`, the MLflow model code).

Uses:
- `code_digest(command)`: sha256 over those files' code (not their docstrings, comments or layout), so a
  checkpoint fingerprint changes with what the stage runs and a comment edit keeps its checkpoint;
- `undeclared_code(dvc.yaml)`: per DVC stage, the files its `deps` do not cover (tests/ops/test_lineage.py).
"""

from __future__ import annotations

import ast
import hashlib
import shlex
from collections.abc import Iterable
from pathlib import Path

from aligntok.ops import dag

PACKAGE = "aligntok"
ENTRY_FILES = ("aligntok/__main__.py", "aligntok/cli.py")
"""Run by every `python -m aligntok <command>`; of cli.py only its module-level imports are followed."""

_TOKENIZER_STAGE = ("aligntok.tokenizer.stages", "aligntok.runtime", "aligntok.ops.lineage")
STAGE_ENTRY: dict[str, tuple[str, ...]] = {
    "encoder": ("aligntok.encoder.sources", "aligntok.runtime"),
    "snapshot": ("aligntok.data.fingerprint", "aligntok.fileio"),
    "ingest": ("aligntok.data.ingest",),
    "validate": ("aligntok.data.validate",),
    "align_latent": _TOKENIZER_STAGE,
    "align_perceptual": _TOKENIZER_STAGE,
    "refine_decoder": _TOKENIZER_STAGE,
    "vae_baseline": _TOKENIZER_STAGE,
    "cache_latents": ("aligntok.diffusion.latent_writer", "aligntok.runtime"),
    "train_dit": ("aligntok.diffusion.train", "aligntok.runtime", "aligntok.ops.lineage"),
    "fid_reference": ("aligntok.eval.reference", "aligntok.runtime"),
    "evaluate": ("aligntok.eval.evaluate", "aligntok.runtime"),
    "text_features": ("aligntok.text.features", "aligntok.distributed", "aligntok.runtime"),
    "t2i_latents": ("aligntok.diffusion.t2i_latents", "aligntok.runtime"),
    "train_t2i": ("aligntok.diffusion.t2i_train", "aligntok.runtime", "aligntok.ops.lineage"),
    "evaluate_t2i": ("aligntok.eval.t2i", "aligntok.runtime"),
}
"""Pipeline command -> the aligntok modules its CLI handler imports (the training commands also compute their
code digest, hence `aligntok.ops.lineage`). tests/ops/test_lineage.py checks each against its handler's imports."""


def package_root() -> Path:
    """The folder that holds the `aligntok` package (the repository root for an editable install)."""
    return Path(__file__).resolve().parents[2]


def _module_file(module: str, root: Path) -> Path | None:
    base = root.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _with_parents(module: str) -> list[str]:
    """'aligntok.a.b' -> ['aligntok', 'aligntok.a', 'aligntok.a.b']: importing a module runs its packages."""
    parts = module.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def _imports(nodes: Iterable[ast.AST], module: str, is_package: bool) -> set[str]:
    """aligntok modules named by the Import/ImportFrom statements among `nodes` (not descending).

    `from aligntok.a import b` names `aligntok.a` and, if it is a module, `aligntok.a.b`."""
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == PACKAGE)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                package = module.split(".") if is_package else module.split(".")[:-1]
                anchor = package[: len(package) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if base.split(".")[0] != PACKAGE:
                continue
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names if a.name != "*")
    return found


def _shipped_siblings(tree: ast.AST, path: Path) -> set[Path]:
    """Files named as `<expr>.with_name("<file>.py")` that exist beside `path` (code shipped by name)."""
    found = set()
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "with_name"
                and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
                and node.args[0].value.endswith(".py") and (path.parent / node.args[0].value).is_file()):
            found.add(path.parent / node.args[0].value)
    return found


def _closure(modules: set[str], root: Path, seen: set[Path]) -> set[Path]:
    """Files of `modules`, their packages and everything they import, transitively (`seen` is not expanded)."""
    files = set(seen)
    queue = [f for m in modules for p in _with_parents(m) if (f := _module_file(p, root)) is not None]
    while queue:
        path = queue.pop()
        if path in files:
            continue
        files.add(path)
        tree = ast.parse(path.read_text(), filename=str(path))
        name = _module_name(path, root)
        named = _imports(ast.walk(tree), name, path.name == "__init__.py")
        queue.extend(f for m in named for p in _with_parents(m) if (f := _module_file(p, root)) is not None)
        queue.extend(_shipped_siblings(tree, path))
    return files


def _entry_imports(cli: Path) -> set[str]:
    """The aligntok modules cli.py imports at module level (run by every command)."""
    return _imports(ast.parse(cli.read_text(), filename=str(cli)).body, f"{PACKAGE}.cli", False)


def stage_code(command: str, root: Path | None = None) -> list[str]:
    """Repo-relative paths (sorted) of every aligntok source file that `python -m aligntok <command>` may run."""
    if command not in STAGE_ENTRY:
        raise ValueError(f"no entry modules declared for aligntok command {command!r} (aligntok.ops.lineage."
                         f"STAGE_ENTRY); known: {sorted(STAGE_ENTRY)}")
    root = Path(root) if root is not None else package_root()
    entry = {root / f for f in ENTRY_FILES}
    modules = _entry_imports(root / PACKAGE / "cli.py") | set(STAGE_ENTRY[command])
    files = _closure(modules | {PACKAGE}, root, entry)
    return sorted(f.relative_to(root).as_posix() for f in files)


def _without_docstrings(tree: ast.AST) -> ast.AST:
    """`tree` with the docstring of its module, classes and functions removed (a body keeps a `pass`)."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                    and isinstance(first.value.value, str):
                node.body = node.body[1:] or [ast.Pass()]
    return tree


def source_code(path: Path) -> bytes:
    """What of a Python file runs: its syntax tree without docstrings, comments, blank lines or positions."""
    tree = _without_docstrings(ast.parse(path.read_text(), filename=str(path)))
    return ast.dump(tree, include_attributes=False).encode()


def code_digest(command: str, root: Path | None = None) -> str:
    """sha256 (hex) over the paths and code (`source_code`) of `stage_code(command)`: changes when what any
    of them runs does, not when a comment or docstring does."""
    root = Path(root) if root is not None else package_root()
    digest = hashlib.sha256()
    for relative in stage_code(command, root):
        data = source_code(root / relative)
        digest.update(f"{relative}\0{len(data)}\0".encode())
        digest.update(data)
    return digest.hexdigest()


def aligntok_command(cmd: str | list[str], commands: Iterable[str]) -> str | None:
    """The aligntok command a DVC `cmd` runs (`python -m aligntok [options] <command> ...` or
    `aligntok <command>`, also under torchrun), or None."""
    lines = [cmd] if isinstance(cmd, str) else list(cmd)
    known = set(commands)
    for line in lines:
        tokens = shlex.split(line, comments=True)
        for i, token in enumerate(tokens):
            is_module = token == PACKAGE and i > 0 and tokens[i - 1] == "-m"
            if is_module or Path(token).name == PACKAGE:
                return next((t for t in tokens[i + 1:] if t in known), None)
    return None


def stage_commands(dvc_yaml: Path | str) -> dict[str, str]:
    """DVC stage -> the pipeline command (a `STAGE_ENTRY` key) its `cmd` runs, for every stage that runs one."""
    known = set(STAGE_ENTRY)
    found = {name: aligntok_command(stage.get("cmd", ""), known) for name, stage in dag.stages(dvc_yaml).items()}
    return {name: command for name, command in found.items() if command is not None}


def _dep_paths(deps: list | None) -> list[str]:
    """DVC lists deps as plain strings or one-key mappings ({path: options})."""
    out: list[str] = []
    for entry in deps or []:
        out.extend([entry] if isinstance(entry, str) else list(entry))
    return [p.rstrip("/") for p in out]


def covered(path: str, deps: Iterable[str]) -> bool:
    """Whether a dep names `path` or a folder above it."""
    return any(path == dep or path.startswith(dep + "/") for dep in deps)


def undeclared_code(dvc_yaml: Path | str, root: Path | None = None) -> dict[str, list[str]]:
    """Per stage that runs an aligntok command: the files of `stage_code` that no dep covers (empty if none)."""
    stages = dag.stages(dvc_yaml)
    return {name: [f for f in stage_code(command, root) if not covered(f, _dep_paths(stages[name].get("deps")))]
            for name, command in stage_commands(dvc_yaml).items()}
