"""Render `stage-pytorchjob.yaml` for one pipeline stage: a multi-node PyTorchJob running that stage's dvc.yaml
command under torchrun on every GPU of every node.

    python infra/k8s/pytorchjob.py STAGE [--nodes N] [--gpus-per-node G] [--params FILE] [--image IMAGE]

prints the manifest (pipe it to `kubectl apply -f -`). The command is the stage's `cmd` in dvc.yaml with its
`${...}` filled from the params file (as DVC does), `python -m aligntok ...` becoming `torchrun -m aligntok ...`,
so that afterwards `dvc commit STAGE` in the checkout records the outputs. Refuses a stage that does not run
on GPUs, and a training stage whose global batch does not split over nodes x GPUs.
"""

from __future__ import annotations

import argparse
import copy
import shlex
import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
TEMPLATE = Path(__file__).with_name("stage-pytorchjob.yaml")
sys.path.insert(0, str(REPO))

from aligntok.cli import DISTRIBUTED_COMMANDS  # noqa: E402
from aligntok.ops.dag import TEMPLATE as PLACEHOLDER, _lookup, stages as dvc_stages  # noqa: E402


class RenderError(ValueError):
    """A stage or a shape the job cannot run."""


def stage_command(stage: str, dvc_yaml: Path, params: dict[str, Any]) -> list[str]:
    """`aligntok STAGE ...`: the stage's dvc.yaml command, `${...}` resolved from `params`, without `python -m`."""
    stages = dvc_stages(dvc_yaml)
    if stage not in stages:
        raise RenderError(f"{dvc_yaml}: no stage {stage!r}")
    cmd = PLACEHOLDER.sub(lambda m: str(_lookup(params, m.group(1))), stages[stage]["cmd"])
    tokens = shlex.split(cmd, comments=True)
    if tokens[:3] != ["python", "-m", "aligntok"] or tokens[3:4] != [stage]:
        raise RenderError(f"{dvc_yaml}: stage {stage!r} runs {cmd!r}, not `python -m aligntok {stage} ...`")
    return tokens[2:]


def global_batch(stage: str, params: dict[str, Any]) -> int | None:
    """The global batch a training stage splits over its processes (None for the other stages)."""
    section = params.get(stage) or {}
    return section.get("batch_size") if stage == "train_dit" or "train" in section else None


def render(stage: str, nodes: int = 4, gpus_per_node: int = 8, params_file: Path = REPO / "params.yaml",
           image: str | None = None) -> dict[str, Any]:
    """The PyTorchJob of `stage` on `nodes` pods of `gpus_per_node` GPUs each."""
    if stage not in DISTRIBUTED_COMMANDS:
        raise RenderError(f"{stage!r} does not run on GPUs; GPU stages: {', '.join(DISTRIBUTED_COMMANDS)}")
    if nodes < 1 or gpus_per_node < 1:
        raise RenderError(f"--nodes {nodes} --gpus-per-node {gpus_per_node}: both must be at least 1")
    params = yaml.safe_load(Path(params_file).read_text()) or {}
    world = nodes * gpus_per_node
    batch = global_batch(stage, params)
    if batch is not None and batch % world:
        raise RenderError(f"{params_file}: {stage}.batch_size {batch} does not split over {nodes} x {gpus_per_node} "
                          f"= {world} processes")
    command = stage_command(stage, REPO / "dvc.yaml", params)
    job = yaml.safe_load(TEMPLATE.read_text())
    job["metadata"]["name"] = f"aligntok-{stage.replace('_', '-')}"
    job["spec"]["nprocPerNode"] = str(gpus_per_node)
    replicas = job["spec"]["pytorchReplicaSpecs"]
    replicas["Worker"] = copy.deepcopy(replicas["Master"]) | {"replicas": nodes - 1}
    if nodes == 1:
        del replicas["Worker"]
    for spec in replicas.values():
        (container,) = spec["template"]["spec"]["containers"]
        container["command"] = ["torchrun"]
        container["args"] = ["-m", *command, *([] if "--no-progress" in command else ["--no-progress"])]
        resources = container["resources"]
        resources["requests"]["nvidia.com/gpu"] = resources["limits"]["nvidia.com/gpu"] = gpus_per_node
        if image:
            container["image"] = image
    return job


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", help=f"a GPU stage: {', '.join(DISTRIBUTED_COMMANDS)}")
    parser.add_argument("--nodes", type=int, default=4, help="pods, one per node (default: 4)")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="GPUs and processes per pod (default: 8)")
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml",
                        help="the params file the checkout runs (default: params.yaml); fills dvc.yaml's ${...}")
    parser.add_argument("--image", help="the project image (default: the template's aligntok:gpu)")
    args = parser.parse_args(argv)
    try:
        job = render(args.stage, args.nodes, args.gpus_per_node, args.params, args.image)
    except (RenderError, OSError) as exc:
        print(f"pytorchjob.py: error: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write(yaml.safe_dump(job, sort_keys=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
