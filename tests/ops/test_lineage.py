"""Stage lineage: the code each stage runs (its import closure) and dvc.yaml's deps covering it."""

from __future__ import annotations

import argparse
import ast
import shutil
from pathlib import Path

import pytest
import yaml

import aligntok.cli as cli
from aligntok.ops.lineage import STAGE_ENTRY, _imports, _module_file, _module_name, aligntok_command, code_digest, \
    covered, stage_code, stage_commands, undeclared_code

from support.paths import REPO

DVC_YAML = REPO / "dvc.yaml"
COMMON = {"aligntok/__init__.py", "aligntok/__main__.py", "aligntok/cli.py", "aligntok/config.py", "aligntok/errors.py"}
STAGES = stage_commands(DVC_YAML)  # read at collection: a stage added later is checked too


CLI_COMMANDS = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices


def test_every_stage_that_runs_aligntok_is_checked() -> None:
    names = yaml.safe_load(DVC_YAML.read_text())["stages"]
    assert {"encoder", "snapshot", "ingest", "validate", "align_latent", "align_perceptual", "refine_decoder",
            "vae_baseline", "cache_latents", "train_dit"} <= set(STAGES)
    running = {name for name, stage in names.items() if "aligntok" in str(stage.get("cmd", ""))}
    assert running == set(STAGES), f"stages whose aligntok command was not recognised: {running - set(STAGES)}"
    by_cli = {name: aligntok_command(stage.get("cmd", ""), CLI_COMMANDS) for name, stage in names.items()}
    assert {n: c for n, c in by_cli.items() if c is not None} == STAGES  # every command DVC runs has an entry


def _handler_imports(handler: str) -> set[str]:
    """The aligntok modules a cli.py handler imports, and the cli.py functions it calls (read with ast)."""
    tree = ast.parse((REPO / "aligntok" / "cli.py").read_text())
    functions = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    found, todo, done = set(), [handler], set()
    while todo:
        name = todo.pop()
        if name in done or name not in functions:
            continue
        done.add(name)
        body = list(ast.walk(functions[name]))
        found |= _imports(body, "aligntok.cli", False)
        todo.extend(n.id for n in body if isinstance(n, ast.Name) and n.id in functions)
    return {m for m in found if _module_file(m, REPO) is not None}


@pytest.mark.parametrize("command", sorted(STAGE_ENTRY))
def test_the_entry_table_covers_what_the_cli_handler_imports(command: str) -> None:
    """STAGE_ENTRY is the lineage's word for what a command runs; the CLI's handler may import no module
    beyond the closure of those entries (else an edit of that module would not change the code digest)."""
    handler = CLI_COMMANDS[command].get_default("handler").__name__
    files = set(stage_code(command))
    beyond = {m for m in _handler_imports(handler) if _module_file(m, REPO).relative_to(REPO).as_posix() not in files}
    assert not beyond, f"`aligntok {command}` ({handler}) imports {sorted(beyond)}, not in STAGE_ENTRY[{command!r}]"
    assert set(STAGE_ENTRY[command]) <= _handler_imports(handler) | {"aligntok.ops.lineage", "aligntok.runtime"}


def _library_imports() -> dict[str, set[str]]:
    """Every aligntok module -> the aligntok modules it imports anywhere (module level or inside functions)."""
    graph = {}
    for path in sorted((REPO / "aligntok").rglob("*.py")):
        name = _module_name(path, REPO)
        named = _imports(ast.walk(ast.parse(path.read_text())), name, path.name == "__init__.py")
        graph[name] = {m for m in named if _module_file(m, REPO) is not None} - {name}
    return graph


def test_no_library_module_imports_the_cli_and_there_is_no_import_cycle() -> None:
    graph = _library_imports()
    assert sorted(m for m, deps in graph.items() if "aligntok.cli" in deps) == ["aligntok.__main__"]
    cycles, state = [], {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for dep in sorted(graph.get(module, ())):
            if state.get(dep) == "open":
                cycles.append(path[path.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, path + [dep])
        state[module] = "done"

    for module in graph:
        if module not in state:
            visit(module, [module])
    assert not cycles, f"import cycles: {cycles}"


@pytest.fixture(scope="module")
def undeclared() -> dict[str, list[str]]:
    return undeclared_code(DVC_YAML)


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_dvc_deps_cover_the_code_the_stage_runs(stage: str, undeclared: dict[str, list[str]]) -> None:
    missing = undeclared[stage]
    assert not missing, (f"dvc.yaml stage {stage!r} runs `aligntok {STAGES[stage]}`, which imports files that its "
                         f"deps do not cover (edits would leave stale results): {missing}; add them to its deps")


def test_closure_follows_lazy_imports_and_stays_narrow() -> None:
    encoder = set(stage_code("encoder"))
    assert COMMON <= encoder
    assert "aligntok/encoder/onnx_import.py" in encoder  # imported inside a function of sources.py
    assert not any(f.startswith(("aligntok/tokenizer/", "aligntok/diffusion/", "aligntok/data/")) for f in encoder)
    dit = set(stage_code("train_dit"))
    assert {"aligntok/diffusion/latents.py", "aligntok/data/loader.py", "aligntok/config.py",
            "aligntok/diffusion/pyfunc.py"} <= dit  # pyfunc.py: shipped by name to MLflow
    cache = set(stage_code("cache_latents"))
    assert {"aligntok/tokenizer/api.py", "aligntok/tokenizer/model.py", "aligntok/tokenizer/__init__.py"} <= cache
    assert "aligntok/diffusion/train.py" not in cache
    ingest = set(stage_code("ingest"))
    assert COMMON | {"aligntok/data/ingest.py", "aligntok/data/images.py", "aligntok/data/sources.py",
                     "aligntok/data/__init__.py"} <= ingest
    assert not any(f.startswith("aligntok/data/validate/") for f in ingest) and "aligntok/data/loader.py" not in ingest
    validate = set(stage_code("validate"))
    assert {"aligntok/data/validate/__init__.py", "aligntok/data/validate/expectations.py",
            "aligntok/data/shards.py"} <= validate
    assert "aligntok/data/shards.py" in dit and "aligntok/data/images.py" not in dit  # the shard format, not ingest's


def test_relative_imports_resolve_against_the_package() -> None:
    tree = ast.parse("from . import b\nfrom .c import d\nfrom ..e import f\nimport os\nfrom numpy import x")
    assert _imports(tree.body, "aligntok.a.m", False) == {"aligntok.a", "aligntok.a.b", "aligntok.a.c",
                                                           "aligntok.a.c.d", "aligntok.e", "aligntok.e.f"}
    assert _imports(tree.body, "aligntok.a", True) == {"aligntok.a", "aligntok.a.b", "aligntok.a.c",
                                                        "aligntok.a.c.d", "aligntok.e", "aligntok.e.f"}


@pytest.mark.parametrize(("cmd", "command"), [
    ("python -m aligntok encoder --out models/encoder", "encoder"),
    ("python -m aligntok ingest data/shards   # SOURCE from data.source", "ingest"),
    ("python -m aligntok --params configs/x.yaml --set data.resolution=64 align_latent --data d", "align_latent"),
    ("torchrun --nproc_per_node 2 -m aligntok train_dit --latents data/latents", "train_dit"),
    (["mkdir -p out", "aligntok cache_latents --out data/latents"], "cache_latents"),
    ("python scripts/other.py align_latent", None),
])
def test_aligntok_command_of_a_dvc_cmd(cmd: str | list[str], command: str | None) -> None:
    known = {"encoder", "ingest", "align_latent", "train_dit", "cache_latents"}
    assert aligntok_command(cmd, known) == command


def test_a_folder_dep_covers_the_files_under_it() -> None:
    assert covered("aligntok/train/loop.py", ["aligntok/train"])
    assert covered("aligntok/cli.py", ["aligntok/cli.py"])
    assert not covered("aligntok/training.py", ["aligntok/train"])
    assert not covered("aligntok/train/loop.py", ["aligntok/train/checkpoint.py"])


def test_code_digest_changes_with_the_stage_code_only(tmp_path: Path) -> None:
    shutil.copytree(REPO / "aligntok", tmp_path / "aligntok", ignore=shutil.ignore_patterns("__pycache__"))
    before = code_digest("ingest", tmp_path)
    assert before == code_digest("ingest", REPO) and len(before) == 64
    with open(tmp_path / "aligntok" / "tokenizer" / "stages.py", "a") as handle:  # not run by ingest
        handle.write("\n# unrelated edit\n")
    assert code_digest("ingest", tmp_path) == before
    images = tmp_path / "aligntok" / "data" / "images.py"  # run by ingest
    source = images.read_text()
    images.write_text('"""A new module docstring."""\n# a comment\n\n' + source.split('"""', 2)[2] + "\n# edit\n")
    assert code_digest("ingest", tmp_path) == before  # docstrings, comments and blank lines are not code
    images.write_text(source + "\nEDITED = 1\n")
    assert code_digest("ingest", tmp_path) != before
