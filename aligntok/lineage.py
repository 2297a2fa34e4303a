"""Which source files a pipeline stage runs: the aligntok-internal import closure of its command.

`python -m aligntok <command>` runs `aligntok/__main__.py`, then `aligntok/cli.py`, then the
command's handler, which imports its library modules lazily (inside the function). `stage_code`
follows those imports statically with `ast` (nothing is imported but the CLI parser, to find the
handler): the module-level imports of `cli.py`, the imports inside the handler and the `cli.py`
helpers it calls, then every aligntok import of every module reached, at module level or inside
functions, since a lazy import is code the stage may run. Package `__init__.py` files count (importing
`aligntok.a.b` runs them), and so does a sibling file a module ships by name
(`Path(__file__).with_name("pyfunc.py")`, the MLflow model code).

Uses:
- `code_digest(command)`: sha256 over those files, so a checkpoint fingerprint changes with the code;
- `undeclared_code(dvc.yaml)`: per DVC stage, the files its `deps` do not cover (tests/test_lineage.py).
"""

from __future__ import annotations

import ast
import hashlib
import shlex
from collections.abc import Iterable
from pathlib import Path

from aligntok import dag

PACKAGE = "aligntok"
ENTRY_FILES = ("aligntok/__main__.py", "aligntok/cli.py")
"""Run by every `python -m aligntok <command>`; cli.py's own imports are followed per handler only."""


def package_root() -> Path:
    """The folder that holds the `aligntok` package (the repository root for an editable install)."""
    return Path(__file__).resolve().parent.parent


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


def command_handler(command: str) -> str:
    """Name of the `aligntok/cli.py` function that runs `aligntok <command>`."""
    import argparse

    from aligntok.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    if command not in commands:
        raise ValueError(f"unknown aligntok command {command!r}; known: {sorted(commands)}")
    return commands[command].get_default("handler").__name__


def _handler_imports(cli_tree: ast.Module, handler: str) -> set[str]:
    """Imports at cli.py's module level, inside `handler`, and inside the cli.py functions it calls."""
    functions = {n.name: n for n in cli_tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    found = _imports(cli_tree.body, f"{PACKAGE}.cli", False)
    todo, done = [handler], set()
    while todo:
        name = todo.pop()
        if name in done or name not in functions:
            continue
        done.add(name)
        body = list(ast.walk(functions[name]))
        found |= _imports(body, f"{PACKAGE}.cli", False)
        todo.extend(n.id for n in body if isinstance(n, ast.Name) and n.id in functions)
    return found


def stage_code(command: str, root: Path | None = None) -> list[str]:
    """Repo-relative paths (sorted) of every aligntok source file that `python -m aligntok <command>` may run."""
    root = Path(root) if root is not None else package_root()
    cli = root / PACKAGE / "cli.py"
    entry = {root / f for f in ENTRY_FILES}
    modules = _handler_imports(ast.parse(cli.read_text(), filename=str(cli)), command_handler(command))
    files = _closure(modules | {PACKAGE}, root, entry)
    return sorted(f.relative_to(root).as_posix() for f in files)


def code_digest(command: str, root: Path | None = None) -> str:
    """sha256 (hex) over the paths and bytes of `stage_code(command)`: changes when any of them does."""
    root = Path(root) if root is not None else package_root()
    digest = hashlib.sha256()
    for relative in stage_code(command, root):
        data = (root / relative).read_bytes()
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
    """DVC stage -> the aligntok command its `cmd` runs, for every stage that runs one."""
    import argparse

    from aligntok.cli import build_parser

    parser = build_parser()
    known = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
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
