"""benchmarks/peers.py runs end to end at tiny sizes and writes a report whose ratios are ours / peer."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import REPO


def test_peer_benchmarks_quick_run_writes_consistent_reports(tmp_path: Path) -> None:
    out = tmp_path / "benchmarks"
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "peers.py"), "--quick", "--out", str(out)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["threads"] and report["torch"] and report["cpu"] and report["diffusers"]
    names = [r["benchmark"] for r in report["results"]]
    assert any("encode" in n for n in names) and any("decode" in n for n in names)
    assert any(n.startswith("DiT train step") for n in names) and any(n.startswith("sampling") for n in names)
    assert any(n.startswith("data loading") for n in names) == (REPO.parent / "shared/data/imagenet-sample").is_dir()
    for row in report["results"]:
        assert row["ours_rate"] > 0 and row["peer_rate"] > 0
        assert abs(row["ratio"] - row["ours_rate"] / row["peer_rate"]) < 1e-9
        assert "aligntok" in row["ours"]
        assert ("torchvision" if row["benchmark"].startswith("data loading") else "diffusers") in row["peer"]
    table = out.with_suffix(".md").read_text()
    assert all(f"| {name} |" in table for name in names)


def test_gpu_check_runs_on_cpu_at_tiny_size(tmp_path: Path) -> None:
    result = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--tiny"], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads((REPO / "benchmarks" / "out" / "gpu_check.json").read_text())
    assert figures["preset"] == "LightningDiT-T/1" and figures["dtype"] == "torch.float32"
    for stage in ("align_latent", "align_perceptual", "refine_decoder"):
        assert figures[f"tokenizer_train_{stage}_images_per_s"] > 0
    assert figures["dit_train_samples_per_s"] > 0 and 0 < figures["dit_mfu"] < 1
    assert abs(figures["dit_train_ratio"] - figures["dit_train_samples_per_s"] / figures["dit_train_peer_samples_per_s"]) < 1e-9
    assert "MFU" in result.stdout and "sampling" in result.stdout
    # then every stage's own code, a few steps at the preset's shapes (here the tiny preset's, on the CPU)
    stages = json.loads((REPO / "benchmarks" / "out" / "gpu_stages.json").read_text())
    assert stages["preset"] == "tiny.yaml"
    for stage in ("align_latent", "align_perceptual", "refine_decoder", "vae_baseline", "cache_latents",
                  "train_dit", "fid_reference", "evaluate"):
        assert stages[f"{stage}_seconds"] > 0, stage
        assert f"stage {stage}" in result.stdout, stage
    assert stages["train_dit_seconds_per_step"] > 0 and stages["evaluate_gfid_cfg"] > 0
