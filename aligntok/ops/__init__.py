"""Operations: what runs, tracks, versions and judges the pipeline, above the ML packages.

- `dag`: the one reader of `dvc.yaml` (stages, their order and paths); `lineage`: the code each stage runs and
  its digest (checkpoint fingerprints, dvc.yaml's deps);
- `tracking`: every MLflow call; `model_card`: what a registered version's description says; `provenance`: the
  tags a pipeline run leaves on its versions and `aligntok lineage`; `promote`: metric-gated `@champion`;
- `pipeline_run` and `workspace`: what a Prefect flow run needs besides orchestration (flows/ holds that): an
  isolated git worktree per deployment, a run commit per result;
- `study` and `ablation`: the paper's comparisons, run as DVC experiments or long stage-2 runs.

Nothing is imported here eagerly; import the submodule you need.
"""
