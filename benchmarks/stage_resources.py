"""Per-stage wall time, CPU time and peak memory of one pipeline run, from the records its stages wrote.

Every `aligntok` command appends one JSON line when it exits (`aligntok.runtime.record_resources`) if
`ALIGNTOK_RESOURCE_LOG` names a file; `make run` sets it to `.dvc/tmp/run_resources.jsonl` (emptied first)
and prints this table at the end. Peak RSS is the stage process's own high-water mark. The records also
hold `children_peak_rss_mb`, the largest child process (ingest's workers), which the table leaves out: a
forked child (a `git` call) reports the pages it shared with its parent, so it mostly repeats the parent's.

    python benchmarks/stage_resources.py .dvc/tmp/run_resources.jsonl
    python benchmarks/stage_resources.py .dvc/tmp/run_resources.jsonl --out reports/run_resources.md
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from pathlib import Path


def read_records(path: Path) -> list[dict]:
    """The JSON lines of `path`, in the order the stages ended; a line that does not parse is an error."""
    if not path.is_file():
        raise SystemExit(f"{path}: not found (run the pipeline with ALIGNTOK_RESOURCE_LOG={path}, e.g. `make run`)")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise SystemExit(f"{path}:{number}: not a JSON record ({exc.msg})") from None
    return records


def table(records: list[dict]) -> str:
    """A markdown table, one row per stage process and a total row (wall from the first start to the last end)."""
    lines = ["| stage | wall | CPU (user + system) | peak RSS | exit |", "|---|---|---|---|---|"]
    for r in records:
        cpu = r["user_seconds"] + r["system_seconds"]
        rss = f"{r['peak_rss_mb'] / 1024:.2f} GB"
        lines.append(f"| {r['command']} | {r['wall_seconds']:.0f} s | {cpu:.0f} s | {rss} | {r['exit_code']} |")
    if records:
        wall = max(r["ended"] for r in records) - min(r["started"] for r in records)
        cpu = sum(r["user_seconds"] + r["system_seconds"] for r in records)
        peak = max(r["peak_rss_mb"] for r in records) / 1024
        lines.append(f"| **all {len(records)} stages** | **{wall / 60:.1f} min** (first start to last end) | "
                     f"**{cpu / 60:.1f} min** | **{peak:.2f} GB** (largest) | |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("log", type=Path, help="the JSON-lines file the stages appended to")
    parser.add_argument("--out", type=Path, help="also write the table (with a header) to this markdown file")
    parser.add_argument("--title", default="", help="what run this was (command, commit, machine), for --out")
    args = parser.parse_args()
    records = read_records(args.log)
    if not records:
        print(f"{args.log}: no stage ran (everything was up to date)")
        return 0
    text = table(records)
    print(text)
    if args.out:
        started = datetime.fromtimestamp(min(r["started"] for r in records), UTC).isoformat(timespec="seconds")
        header = f"# Per-stage resources of one pipeline run\n\n{args.title or 'Run'} (first stage started {started}).\n\n"
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(header + text + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
