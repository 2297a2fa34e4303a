"""Command line: `aligntok <command>` / `python -m aligntok <command>`.

Each DVC stage is one command that reads its section of the parameter file; the
ops commands (ingest, validate, ...) take explicit paths. This module only parses
arguments and calls the library; heavy imports happen inside the handlers so that
`aligntok --help` stays fast.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any, Callable

import yaml

from aligntok.config import ConfigError, Params, dump_params, load_params

log = logging.getLogger("aligntok")


class CommandError(RuntimeError):
    """An expected failure: printed as one line, exit code 1."""


def _params(args: argparse.Namespace) -> Params:
    overrides: dict[str, Any] = {}
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set data.resolution=64")
        overrides[key] = yaml.safe_load(value)
    return load_params(args.params, overrides)


def cmd_config(args: argparse.Namespace) -> int:
    print(dump_params(_params(args)))
    return 0


def cmd_encoder(args: argparse.Namespace) -> int:
    params = _params(args)  # validate before any heavy import or work
    from aligntok.encoder.sources import export_encoder

    desc = export_encoder(params.encoder, Path(args.out))
    log.info(
        "encoder %s: %s, %d/%d blocks, width %d, %.1fM parameters -> %s",
        desc["source"], desc["arch"], desc["depth"], desc["total_depth"],
        desc["feature_width"], desc["num_params"] / 1e6, args.out,
    )
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    params = _params(args)  # validate before any heavy import or work
    from aligntok.data.ingest import ingest

    source = args.source or params.data.source
    summary = ingest(source, Path(args.out_dir), params.data, progress=not args.no_progress)
    log.info(
        "ingest %s: %d inputs -> %d train, %d val, %d rejected in %.1f s (%.0f images/s)",
        source, summary.inputs, summary.train, summary.val, summary.rejected,
        summary.seconds, summary.images_per_s,
    )
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    params = _params(args)  # validate before any heavy import or work
    from aligntok.data.validate import format_summary, validate_dataset

    report_dir = Path(args.report_dir) if args.report_dir else None
    report = validate_dataset(Path(args.data_dir), params.validate_, report_dir)
    print(format_summary(report))
    if not report.success:
        raise CommandError("validation failed: " + ", ".join(report.failed))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aligntok",
        description="Align a vision foundation encoder into a diffusion tokenizer. "
        "Pipeline stages (run by `dvc repro`): encoder, ingest, validate.",
    )
    parser.add_argument("--params", default="params.yaml", metavar="PATH",
                        help="parameter file (default: params.yaml; presets in configs/)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="override one parameter, e.g. --set data.resolution=64 (repeatable)")
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings only")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, handler: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        command = sub.add_parser(name, help=help, description=help)
        command.set_defaults(handler=handler)
        return command

    add("config", cmd_config, "validate the parameter file and print the resolved configuration")

    encoder = add("encoder", cmd_encoder,
                  "stage `encoder`: export the foundation encoder (encoder.source) as safetensors + JSON")
    encoder.add_argument("--out", default="models/encoder", help="output folder (default: models/encoder)")

    ingest = add("ingest", cmd_ingest,
                 "stage `ingest`: images to WebDataset shards + manifest.parquet + rejected.csv")
    ingest.add_argument("source", nargs="?", help="fashion-mnist | imagefolder:PATH | webdataset:URL "
                        "(default: data.source)")
    ingest.add_argument("out_dir", help="output folder for shards, manifest and rejected list")
    ingest.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    validate = add("validate", cmd_validate,
                   "stage `validate`: Great Expectations checks of shards + manifest; fails on any failed expectation")
    validate.add_argument("data_dir", help="folder written by `aligntok ingest`")
    validate.add_argument("--report-dir", help="where validation.json/.txt go (default: DATA_DIR)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        return args.handler(args)
    except (ConfigError, CommandError) as exc:
        print(f"aligntok {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except FileNotFoundError as exc:
        print(f"aligntok {args.command}: error: {exc}", file=sys.stderr)
        return 1
