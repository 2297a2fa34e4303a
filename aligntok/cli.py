"""Command line: `aligntok <command>` / `python -m aligntok <command>`.

Each DVC stage is one command that reads its section of the parameter file; the
ops commands (ingest, validate, ...) take explicit paths. This module only parses
arguments and calls the library; heavy imports happen inside the handlers so that
`aligntok --help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable

import yaml

from aligntok.telemetry import disable_telemetry

# The one side effect at import, allowed here because this module is an entry point (the library
# itself sets nothing at import): telemetry off before MLflow, GX or a `dvc` subprocess starts.
disable_telemetry()

from aligntok.errors import AligntokError  # noqa: E402
from aligntok.config import (  # noqa: E402
    TOKENIZER_STAGES, ConfigError, DataConfig, Params, TokenizerStageConfig, dump_params, load_params, params_yaml,
    yaml_problem,
)

log = logging.getLogger("aligntok")


class CommandError(AligntokError, RuntimeError):
    """An expected failure: printed as one line, exit code 1."""


def _params(args: argparse.Namespace) -> Params:
    overrides: dict[str, Any] = {}
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train_dit.steps=500")
        try:
            overrides[key] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML: {yaml_problem(exc)}") from None
    return load_params(args.params, overrides)


def _compute_params(args: argparse.Namespace) -> Params:
    """`_params` for the commands that run torch: also sets its thread count (`runtime.threads`) before any work,
    since torch sizes its pools at the first op. The others (config, promote) stay free of the torch import."""
    params = _params(args)
    from aligntok.runtime import configure_threads

    configure_threads(params.runtime)
    return params


def _is_main_rank() -> bool:
    """Rank 0 (or no launcher): the process that prints a stage's result."""
    return int(os.environ.get("RANK", "0") or 0) == 0


def _print_result(result: dict[str, Any]) -> None:
    if _is_main_rank():
        print(json.dumps(result, indent=2))


def cmd_config(args: argparse.Namespace) -> int:
    params = _params(args)
    if args.out:
        from aligntok.fileio import atomic_write_text

        atomic_write_text(Path(args.out), params_yaml(params, args.params))
        log.info("wrote %s (resolved from %s)", args.out, args.params)
    else:
        print(dump_params(params))
    return 0


def cmd_encoder(args: argparse.Namespace) -> int:
    params = _compute_params(args)  # validate before any heavy import or work
    from aligntok.encoder.sources import export_encoder

    desc = export_encoder(params.encoder, Path(args.out))
    log.info(
        "encoder %s: %s, %d/%d blocks, width %d, %.1fM parameters -> %s",
        desc.source, desc.arch, desc.depth, desc.total_depth, desc.feature_width, desc.num_params / 1e6, args.out,
    )
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    params = _params(args)  # validate before any heavy import or work
    from aligntok.data.ingest import ingest

    source = args.source or params.data.source
    ingest(source, Path(args.out_dir), params.data, progress=not args.no_progress,
           limit=params.data.max_images)  # logs its summary
    return 0


def cmd_snapshot(args: argparse.Namespace) -> int:
    params = _params(args)  # validate before any work
    from aligntok.data.fingerprint import fingerprint, summary, to_json
    from aligntok.fileio import atomic_write_text

    described = fingerprint(params.data, progress=not args.no_progress)
    atomic_write_text(Path(args.out), to_json(described))
    print(f"{summary(described)} -> {args.out}")
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


def cmd_train_tokenizer(args: argparse.Namespace) -> int:
    params = _compute_params(args)
    from aligntok.ops.lineage import code_digest
    from aligntok.tokenizer.stages import StagePaths, run_tokenizer_stage

    start_from = params.stage(args.command).start_from
    previous = args.previous or (str(Path(args.out).parent / start_from) if start_from else None)
    paths = StagePaths(data=Path(args.data), encoder=Path(args.encoder), out=Path(args.out),
                       previous=Path(previous) if previous else None,
                       checkpoints=Path(args.checkpoints),
                       metrics=Path(args.metrics) if args.metrics else None,
                       validation=Path(args.validation))
    result = run_tokenizer_stage(args.command, params, paths, register=not args.no_register,
                                 progress=not args.no_progress, code=code_digest(args.command))
    _print_result({args.command: result.metrics, "receipt": result.receipt})
    return 0


def cmd_encode(args: argparse.Namespace) -> int:
    from aligntok.tokenizer.files import encode_files

    count = encode_files(args.model, [Path(p) for p in args.images], Path(args.out), args.max_pixels)
    log.info("encoded %d images -> %s", count, args.out)
    return 0


def cmd_decode(args: argparse.Namespace) -> int:
    from aligntok.tokenizer.files import decode_file

    written = decode_file(args.model, Path(args.latents), Path(args.out_dir))
    log.info("decoded %d latents -> %s", len(written), args.out_dir)
    return 0


def cmd_cache_latents(args: argparse.Namespace) -> int:
    params = _compute_params(args)
    from aligntok.diffusion.latent_writer import cache_latents

    cache_latents(args.tokenizer, Path(args.data), Path(args.out), params.cache_latents,
                  progress=not args.no_progress, validation=Path(args.validation), runtime=params.runtime)
    return 0


def cmd_train_dit(args: argparse.Namespace) -> int:
    params = _compute_params(args)
    from aligntok.diffusion.train import DiTPaths, run_train_dit
    from aligntok.ops.lineage import code_digest

    paths = DiTPaths(latents=Path(args.latents), tokenizer=Path(args.tokenizer), out=Path(args.out),
                     checkpoints=Path(args.checkpoints), metrics=Path(args.metrics) if args.metrics else None)
    metrics = run_train_dit(params, paths, register=not args.no_register, progress=not args.no_progress,
                            code=code_digest("train_dit"))
    _print_result({"train_dit": metrics})
    return 0


def cmd_text_features(args: argparse.Namespace) -> int:
    params = _compute_params(args)
    from aligntok.distributed import resolve_device
    from aligntok.text.features import cache_text_features

    _print_result({"text_features": cache_text_features(Path(args.data), Path(args.out), params.text,
                                                        device=resolve_device(params.runtime),
                                                        progress=not args.no_progress)})
    return 0


def cmd_t2i_latents(args: argparse.Namespace) -> int:
    params = _compute_params(args)
    from aligntok.diffusion.t2i_latents import cache_t2i_latents

    cache_t2i_latents(params, Path(args.tokenizers), Path(args.data), Path(args.out), Path(args.validation),
                      progress=not args.no_progress)
    return 0


def cmd_train_t2i(args: argparse.Namespace) -> int:
    params = _compute_params(args)
    from aligntok.diffusion.t2i_train import T2IPaths, run_train_t2i
    from aligntok.ops.lineage import code_digest

    paths = T2IPaths(latents=Path(args.latents), text=Path(args.text), tokenizers=Path(args.tokenizers),
                     out=Path(args.out), checkpoints=Path(args.checkpoints),
                     metrics=Path(args.metrics) if args.metrics else None)
    _print_result({"train_t2i": run_train_t2i(params, paths, register=not args.no_register,
                                              progress=not args.no_progress, code=code_digest("train_t2i"))})
    return 0


def cmd_evaluate_t2i(args: argparse.Namespace) -> int:
    params = _compute_params(args)
    from aligntok.eval.t2i import T2IEvalPaths, run_evaluate_t2i

    paths = T2IEvalPaths(data=Path(args.data), encoder=Path(args.encoder), text=Path(args.text),
                         models=Path(args.models), out=Path(args.out), metrics=Path(args.metrics),
                         report=Path(args.report) if args.report else None)
    metrics = run_evaluate_t2i(params, paths, register=not args.no_register, progress=not args.no_progress)
    _print_result({k: v for k, v in metrics.items() if k in ("skipped", "mlflow_run_id", "judges_on_real")})
    return 0


def cmd_fid_reference(args: argparse.Namespace) -> int:
    params = _compute_params(args)
    from aligntok.eval.reference import build_reference

    build_reference(Path(args.data), Path(args.encoder), Path(args.out), params.evaluate,
                    progress=not args.no_progress, validation=Path(args.validation), runtime=params.runtime)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    params = _compute_params(args)
    from aligntok.eval.evaluate import EvalPaths, run_evaluate

    paths = EvalPaths(data=Path(args.data), encoder=Path(args.encoder), reference=Path(args.reference),
                      tokenizers=Path(args.tokenizers), dit=Path(args.dit), out=Path(args.out),
                      metrics=Path(args.metrics), plots=Path(args.plots), validation=Path(args.validation))
    metrics = run_evaluate(params, paths, register=not args.no_register, progress=not args.no_progress)
    if metrics is not None:
        _print_result(metrics)
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    from aligntok.ops.study import run_study, write_report

    results, report = Path(args.results), Path(args.report)
    if args.report_only:
        write_report(results, report)
    else:
        run_study(Path.cwd(), variants=args.variants, seeds=args.seeds, extra_seeds=args.extra_seeds,
                  results=results, report=report)
    log.info("study report -> %s", report)
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    if args.prompt:
        from aligntok.diffusion.files import write_prompt_samples

        written = write_prompt_samples(args.model, prompts=args.prompt, per_prompt=args.per_class, steps=args.steps,
                                       cfg_scale=args.cfg, seed=args.seed, out=Path(args.out))
        log.info("wrote %s and %d images beside it", args.out, len(written))
        return 0
    from aligntok.diffusion.files import write_samples

    written = write_samples(args.model, classes=args.classes, per_class=args.per_class, steps=args.steps,
                            cfg_scale=args.cfg, seed=args.seed, out=Path(args.out))
    log.info("wrote %s and %d images beside it", args.out, len(written))
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    from aligntok.ops.promote import promote

    params = _params(args)  # the gate's rules: params.yaml `promote:`
    decision = promote(args.model, args.version, params.promote, force=args.force, reason=args.reason)
    print(decision.message)
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    from aligntok.ops.promote import rollback

    decision = rollback(args.model, _params(args).promote, reason=args.reason)
    print(decision.message)
    return 0


def cmd_lineage(args: argparse.Namespace) -> int:
    from aligntok.ops.provenance import lineage

    print(lineage(args.ref), end="")
    return 0


PEER_FAILURES = ("Connection closed by peer", "Connection reset by peer", "NCCL communicator was aborted")
"""What gloo and NCCL say in the collective of a rank whose peer went away."""


def _peer_failed(exc: BaseException) -> bool:
    """A collective that failed because a peer rank went away, not because of this rank."""
    return isinstance(exc, RuntimeError) and any(marker in str(exc) for marker in PEER_FAILURES)


def _record_rank_error(command: str, exc: BaseException, world_size: int) -> None:
    """A rank's error, for the launcher to end the job with (`aligntok.launch.record_rank_error`)."""
    if isinstance(exc, SystemExit) and not exc.code:
        return
    if world_size > 1 or os.environ.get("ALIGNTOK_ERROR_DIR"):
        from aligntok.launch import record_rank_error

        record_rank_error(command, exc, peer=_peer_failed(exc))


VALIDATION_REPORT = "reports/validation/validation.json"
"""Where the `validate` stage of dvc.yaml writes its report; stages that read the shards check it."""



def _describe_stage(name: str, row: TokenizerStageConfig) -> str:
    """One line for `--help`, read off the stage's default row (the params file's row may differ)."""
    start = f"continues {row.start_from}" if row.start_from else "a new model"
    return f"stage `{name}`: trains {' + '.join(row.train)} of the {row.kind} tokenizer ({start}; see its params row)"


def shard_inputs(command: argparse.ArgumentParser, encoder: bool) -> None:
    """The arguments of a stage that reads the shards: the ingest folder, its validation report (the stage
    refuses to run unless it says success) and, where the stage needs it, the encoder stage's folder."""
    command.add_argument("--data", default="data/shards", help="ingest folder (default: data/shards)")
    command.add_argument("--validation", default=VALIDATION_REPORT, help="the shards' validation report; "
                         f"the stage refuses unless it says success (default: {VALIDATION_REPORT})")
    if encoder:
        command.add_argument("--encoder", default="models/encoder", help="encoder stage folder (default: models/encoder)")


def switches(command: argparse.ArgumentParser, register: bool) -> None:
    """--no-progress, and --no-register for a stage that logs to MLflow and the registry."""
    if register:
        command.add_argument("--no-register", action="store_true", help="skip MLflow tracking and the registry")
    command.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aligntok",
        description="Align a vision foundation encoder into a diffusion tokenizer. "
        "Pipeline stages (run by `dvc repro`): encoder, snapshot, ingest, validate, align_latent, "
        "align_perceptual, refine_decoder, vae_baseline, cache_latents, train_dit, fid_reference, evaluate; "
        "text-to-image: text_features, t2i_latents, train_t2i, evaluate_t2i.",
    )
    parser.add_argument("--params", default="params.yaml", metavar="PATH",
                        help="parameter file (default: params.yaml; presets in configs/)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="override one parameter, e.g. --set train_dit.steps=500 (repeatable)")
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings only")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an error (by default: one line naming the input at fault)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, handler: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        command = sub.add_parser(name, help=help, description=help)
        command.set_defaults(handler=handler)
        return command

    config = add("config", cmd_config, "validate the parameter file and print the resolved configuration")
    config.add_argument("--out", metavar="PATH", help="write it as a complete params file instead (e.g. params.yaml, "
                        "to run a preset under `dvc repro`)")

    encoder = add("encoder", cmd_encoder,
                  "stage `encoder`: export the foundation encoder (encoder.source) as safetensors + JSON")
    encoder.add_argument("--out", default="models/encoder", help="output folder (default: models/encoder)")

    snapshot = add("snapshot", cmd_snapshot,
                   "stage `snapshot`: fingerprint data.source (and data.val_source) as JSON, so that ingest reruns "
                   "when the source changes and only then")
    snapshot.add_argument("--out", default="data/source.json", help="the fingerprint JSON (default: data/source.json)")
    switches(snapshot, register=False)

    ingest = add("ingest", cmd_ingest,
                 "stage `ingest`: images to WebDataset shards + manifest.parquet + rejected.csv")
    ingest.add_argument("source", nargs="?", help="fashion-mnist | fashion-mnist-captioned | imagefolder:PATH | webdataset:URL "
                        "(default: data.source)")
    ingest.add_argument("out_dir", help="output folder for shards, manifest and rejected list")
    switches(ingest, register=False)

    validate = add("validate", cmd_validate,
                   "stage `validate`: Great Expectations checks of shards + manifest; fails on any failed expectation")
    validate.add_argument("data_dir", help="folder written by `aligntok ingest`")
    validate.add_argument("--report-dir", help="where validation.json/.txt go (default: DATA_DIR)")

    defaults = Params()
    for stage in TOKENIZER_STAGES:
        command = add(stage, cmd_train_tokenizer, _describe_stage(stage, defaults.stage(stage)))
        shard_inputs(command, encoder=True)
        command.add_argument("--out", default=f"models/tokenizer/{stage}", help="output folder")
        command.add_argument("--previous", help="folder of the stage this one starts from (its row's "
                             "start_from; default: that stage's folder beside --out)")
        command.add_argument("--checkpoints", default="checkpoints",
                             help="in-progress checkpoints, kept across reruns for resume (default: checkpoints)")
        command.add_argument("--metrics", help="metrics JSON (default: OUT/metrics.json)")
        switches(command, register=True)

    cache = add("cache_latents", cmd_cache_latents,
                "stage `cache_latents`: encode every training image and its flip with the stage-3 tokenizer")
    cache.add_argument("--tokenizer", default="models/tokenizer/refine_decoder",
                       help="tokenizer folder or registry URI (default: models/tokenizer/refine_decoder)")
    shard_inputs(cache, encoder=False)
    cache.add_argument("--out", default="data/latents", help="latent shards + stats.json (default: data/latents)")
    switches(cache, register=False)

    dit = add("train_dit", cmd_train_dit,
              "stage `train_dit`: a LightningDiT with flow matching on the cached latents (torchrun-able)")
    dit.add_argument("--latents", default="data/latents", help="cache_latents folder")
    dit.add_argument("--tokenizer", default="models/tokenizer/refine_decoder", help="tokenizer folder")
    dit.add_argument("--out", default="models/dit", help="output folder (default: models/dit)")
    dit.add_argument("--checkpoints", default="checkpoints", help="in-progress checkpoints (default: checkpoints)")
    dit.add_argument("--metrics", help="metrics JSON (default: OUT/metrics.json)")
    switches(dit, register=True)

    text = add("text_features", cmd_text_features,
               "stage `text_features`: every distinct caption of the shards encoded once by the frozen text encoder "
               "(text.source); a dataset without captions records that the text-to-image stages skip")
    text.add_argument("--data", default="data/shards", help="ingest folder (default: data/shards)")
    text.add_argument("--out", default="data/t2i/text", help="captions.json + feature arrays (default: data/t2i/text)")
    switches(text, register=False)

    t2i_latents = add("t2i_latents", cmd_t2i_latents,
                      "stage `t2i_latents`: the first t2i.max_images captioned training images (and flips) encoded "
                      "by each tokenizer of t2i.tokenizers, one latent cache per tokenizer")
    t2i_latents.add_argument("--tokenizers", default="models/tokenizer",
                             help="folder of tokenizer folders (default: models/tokenizer)")
    shard_inputs(t2i_latents, encoder=False)
    t2i_latents.add_argument("--out", default="data/t2i/latents", help="output folder (default: data/t2i/latents)")
    switches(t2i_latents, register=False)

    t2i = add("train_t2i", cmd_train_t2i,
              "stage `train_t2i`: a FLUX-style text-conditioned DiT per tokenizer of t2i.tokenizers, same steps "
              "(torchrun-able); registered as aligntok-t2i@<tokenizer>")
    t2i.add_argument("--latents", default="data/t2i/latents", help="t2i_latents folder (default: data/t2i/latents)")
    t2i.add_argument("--text", default="data/t2i/text", help="text_features folder (default: data/t2i/text)")
    t2i.add_argument("--tokenizers", default="models/tokenizer", help="folder of tokenizer folders")
    t2i.add_argument("--out", default="models/t2i", help="one model folder per tokenizer (default: models/t2i)")
    t2i.add_argument("--checkpoints", default="checkpoints", help="in-progress checkpoints (default: checkpoints)")
    t2i.add_argument("--metrics", help="metrics JSON (default: OUT/metrics.json)")
    switches(t2i, register=True)

    evaluate_t2i = add("evaluate_t2i", cmd_evaluate_t2i,
                       "stage `evaluate_t2i`: FID on validation captions and prompt agreement (seen and held-out "
                       "colour-garment pairs, with and without guidance, over seeds) of every text-to-image model; "
                       "metrics JSON, sample grids, registry tags, reports/t2i.md")
    evaluate_t2i.add_argument("--data", default="data/shards", help="ingest folder (default: data/shards)")
    evaluate_t2i.add_argument("--encoder", default="models/encoder", help="encoder stage folder (the garment judge)")
    evaluate_t2i.add_argument("--text", default="data/t2i/text", help="text_features folder")
    evaluate_t2i.add_argument("--models", default="models/t2i", help="train_t2i folder (default: models/t2i)")
    evaluate_t2i.add_argument("--out", default="reports/t2i", help="sample grids (default: reports/t2i)")
    evaluate_t2i.add_argument("--metrics", default="reports/metrics/t2i.json", help="metrics JSON (DVC metrics)")
    evaluate_t2i.add_argument("--report", default="reports/t2i.md", help="the generated report (default: reports/t2i.md)")
    switches(evaluate_t2i, register=True)

    reference = add("fid_reference", cmd_fid_reference,
                    "stage `fid_reference`: Inception and encoder features of the reference images (cached)")
    shard_inputs(reference, encoder=True)
    reference.add_argument("--out", default="data/fid_reference", help="output folder (default: data/fid_reference)")
    switches(reference, register=False)

    evaluate = add("evaluate", cmd_evaluate,
                   "stage `evaluate`: rFID/PSNR/SSIM/linear probe of every tokenizer stage, gFID/precision/recall "
                   "of the diffusion model; metrics JSON, plots, grids, registry tags")
    shard_inputs(evaluate, encoder=True)
    evaluate.add_argument("--reference", default="data/fid_reference", help="fid_reference folder")
    evaluate.add_argument("--tokenizers", default="models/tokenizer",
                          help="folder with one folder per tokenizer stage (default: models/tokenizer)")
    evaluate.add_argument("--dit", default="models/dit", help="train_dit folder (default: models/dit)")
    evaluate.add_argument("--out", default="reports/eval", help="grids and protocol.json (default: reports/eval)")
    evaluate.add_argument("--metrics", default="reports/metrics.json", help="metrics JSON (DVC metrics)")
    evaluate.add_argument("--plots", default="reports/plots", help="CSV files for DVC plots")
    switches(evaluate, register=True)

    study = add("study", cmd_study,
                "the small-scale study: tokenizer variants (a)-(f) as `dvc exp run`s, each at every seed "
                "(tokenizer and diffusion), then reports/study.md with verdicts from the confidence intervals "
                "(a variant and seed already in --results with the same overrides is not rerun)")
    study.add_argument("--variants", nargs="*", metavar="NAME",
                       help="a_full b_stage1 c_no_sp d_vae e_vavae f_random (default: all)")
    study.add_argument("--seeds", type=int, nargs="*", default=None, help="seeds of every variant: seed s > 0 "
                       "offsets the seeds of the tokenizer rows the variant trains and the diffusion seed "
                       "(default: 0 1 2)")
    study.add_argument("--extra-seeds", type=int, default=0,
                       help="more seeds for a_full only, after the others (default: 0)")
    study.add_argument("--results", default="reports/study", help="one JSON per variant and seed")
    study.add_argument("--report", default="reports/study.md", help="the generated report")
    study.add_argument("--report-only", action="store_true", help="only regenerate the report from --results")

    sample = add("sample", cmd_sample, "generate class-conditional images with a trained DiT, or with --prompt "
                 "text-conditioned images with a text-to-image model")
    sample.add_argument("--model", required=True, help="DiT folder or registry URI, e.g. models:/aligntok-dit@latest; "
                        "with --prompt a text-to-image folder or URI, e.g. models:/aligntok-t2i@refine-decoder")
    sample.add_argument("--prompt", action="append", metavar="TEXT",
                        help="a prompt, e.g. --prompt 'a red sandal' (repeatable; one grid column per prompt)")
    sample.add_argument("--classes", type=int, nargs="*", help="class indices (default: all)")
    sample.add_argument("--per-class", type=int, default=8,
                        help="images per class, or per prompt with --prompt (default: 8)")
    sample.add_argument("--steps", type=int, help="ODE steps (default: the model's sample.steps)")
    sample.add_argument("--cfg", type=float, help="classifier-free guidance scale (default: the model's)")
    sample.add_argument("--seed", type=int, default=0, help="noise seed (default: 0)")
    sample.add_argument("--out", default="samples/grid.png",
                        help="grid PNG; the individual images go beside it (default: samples/grid.png)")

    encode = add("encode", cmd_encode, "encode image files to latents with a tokenizer")
    encode.add_argument("images", nargs="+", help="image files")
    encode.add_argument("--model", required=True,
                        help="tokenizer folder or registry URI, e.g. models:/aligntok-tokenizer@stage3")
    encode.add_argument("--out", required=True, help="output .safetensors (latents + file names)")
    max_pixels = DataConfig.model_fields["max_pixels"].default
    encode.add_argument("--max-pixels", type=int, default=max_pixels, metavar="N",
                        help=f"refuse images with more pixels, from their header (default: {max_pixels}, "
                        "as data.max_pixels)")

    promote = add("promote", cmd_promote,
                  "move a registered model's @champion to VERSION if its metrics are not worse than the champion's "
                  "(rules: params.yaml promote.models); a refusal exits 1 naming the worse metric")
    promote.add_argument("model", help="registered model, e.g. aligntok-tokenizer")
    promote.add_argument("version", help="version number (7) or alias (@stage3)")
    promote.add_argument("--force", action="store_true", help="promote even if the gate refuses (recorded as forced)")
    promote.add_argument("--reason", help="why; recorded on the version with the decision")

    rollback = add("rollback", cmd_rollback, "swap a registered model's @champion and @previous (the last promotion)")
    rollback.add_argument("model", help="registered model, e.g. aligntok-tokenizer")
    rollback.add_argument("--reason", help="why; recorded on the version with the decision")

    lineage = add("lineage", cmd_lineage,
                  "where a registered version came from (its runs, run commit, source fingerprint, figures) and the "
                  "commands that check its inputs out again in a fresh clone")
    lineage.add_argument("ref", metavar="MODEL@ALIAS|MODEL/VERSION",
                         help="e.g. aligntok-tokenizer@champion or aligntok-dit/3")

    decode = add("decode", cmd_decode, "decode latents (from `aligntok encode`) to PNG images")
    decode.add_argument("latents", help=".safetensors written by `aligntok encode`")
    decode.add_argument("--model", required=True, help="tokenizer folder or registry URI")
    decode.add_argument("--out-dir", required=True, help="folder for the PNG images")
    return parser


DISTRIBUTED_COMMANDS = (*TOKENIZER_STAGES, "cache_latents", "train_dit", "fid_reference", "evaluate",
                        "t2i_latents", "train_t2i")
"""The stages that run as N ranks under `runtime.nproc_per_node` > 1 or an outer torchrun (`aligntok.launch`)."""


def _relaunch_count(args: argparse.Namespace) -> int:
    """How many local processes this command should run as: 1 (run here) unless a distributed stage's
    `runtime.nproc_per_node` (or $ALIGNTOK_NPROC_PER_NODE) asks for more and no launcher started us. The
    placement is checked here too, so that `runtime.device: cuda` without a GPU fails before any work."""
    if args.command not in DISTRIBUTED_COMMANDS:
        return 1
    from aligntok.distributed import check_device, is_launched_rank, resolve_nproc

    runtime = _params(args).runtime
    nproc = 1 if is_launched_rank() else resolve_nproc(runtime)
    check_device(runtime, nproc)
    return nproc


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    rank_tag = f"[rank {os.environ.get('RANK', '0')}/{world}] " if world > 1 else ""
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format=f"%(asctime)s {rank_tag}%(name)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("great_expectations", "mlflow", "alembic", "httpx"):  # their INFO lines drown ours
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # mlflow resets its level from this at import
    code = 1
    try:
        nproc = _relaunch_count(args)
        if nproc > 1:
            from aligntok.launch import relaunch

            code = relaunch(argv, nproc, args.command)
            return code
        code = args.handler(args)
        return code
    except (AligntokError, FileNotFoundError) as exc:  # bad input: one line; anything else is a bug
        _record_rank_error(args.command, exc, world)
        if args.debug:
            raise
        print(f"aligntok {args.command}: error: {rank_tag}{exc}", file=sys.stderr)
        return 1
    except BaseException as exc:
        _record_rank_error(args.command, exc, world)
        if world > 1 and not args.debug and _peer_failed(exc):  # another rank's error is the story; it says it
            print(f"aligntok {args.command}: error: {rank_tag}stopped: another rank failed (a collective lost its "
                  "peer)", file=sys.stderr)
            return 1
        raise
    finally:
        if os.environ.get("ALIGNTOK_RESOURCE_LOG"):  # wall/CPU/peak RSS of this stage process (`make run`)
            from aligntok.runtime import record_resources

            record_resources(args.command, code)
