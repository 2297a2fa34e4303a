"""benchmarks/peers.py runs end to end at tiny sizes and writes a report whose ratios are ours / peer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from support.paths import REPO


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
    from aligntok.config import load_params
    from aligntok.diffusion.t2i_dit import count_parameters

    result = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--tiny"], capture_output=True,
                            text=True, timeout=600, env={**os.environ, "GPU_CHECK_OUT": str(tmp_path)})
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads((tmp_path / "gpu_check.json").read_text())
    assert figures["preset"] == "LightningDiT-T/1" and figures["dtype"] == "torch.float32"
    for stage in ("align_latent", "align_perceptual", "refine_decoder"):
        assert figures[f"tokenizer_train_{stage}_images_per_s"] > 0
    assert figures["dit_train_samples_per_s"] > 0 and 0 < figures["dit_mfu"] < 1
    assert abs(figures["dit_train_ratio"] - figures["dit_train_samples_per_s"] / figures["dit_train_peer_samples_per_s"]) < 1e-9
    assert "MFU" in result.stdout and "sampling" in result.stdout
    # the text-to-image DiT: FLOPs counted, so its MFU is a fraction
    assert figures["t2i_train_samples_per_s"] > 0 and figures["t2i_sampling_images_per_s"] > 0
    assert figures["t2i_tflop_per_sample"] > 0 and 0 < figures["t2i_mfu"] < 1
    tiny = load_params(REPO / "configs" / "tiny.yaml")
    assert figures["t2i_parameters"] == count_parameters("FluxDiT-T", tiny.latent.channels,
                                                         tiny.encoder.image_size // 14, text_width=384)
    # every stage's own code first, a few steps at the preset's shapes (here the tiny preset's, on the CPU)
    stages = json.loads((tmp_path / "gpu_stages.json").read_text())
    assert stages["preset"] == "tiny.yaml" and stages["stand_in_weights"] is False
    for stage in ("align_latent", "align_perceptual", "refine_decoder", "vae_baseline", "cache_latents",
                  "train_dit", "fid_reference", "evaluate", "text_features", "t2i_latents", "train_t2i",
                  "evaluate_t2i"):
        assert stages[f"{stage}_seconds"] > 0, stage
        assert f"stage {stage}" in result.stdout, stage
    assert stages["train_dit_seconds_per_step"] > 0 and stages["evaluate_gfid_cfg"] > 0
    assert stages["train_t2i_seconds_per_step"] > 0 and stages["evaluate_t2i_models"] == 2


def test_data_path_benchmark_quick_run_reports_both_peers_at_each_size(tmp_path: Path) -> None:
    import pytest

    if not (REPO.parent / "shared/data/imagenet-sample").is_dir():
        pytest.skip("the shared photos are not here")
    out = tmp_path / "data_path.json"
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "data_path.py"), "--records", "300", "700",
                             "--steps", "3", "--batch", "16", "--workers", "0", "--tmp", str(tmp_path), "--json",
                             str(out)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert [(r["records"], r["peer"]) for r in report["runs"]] == [
        (n, peer) for n in (300, 700) for peer in ("aligntok", "imagefolder")]
    assert all(r["images"] == 3 * 16 and r["images_per_s"] > 0 and r["peak_rss_mb"] > 0 for r in report["runs"])
    runs = {(r["records"], r["peer"]): r for r in report["runs"]}
    for n, ratio in report["throughput_ratio_vs_imagefolder"].items():
        assert ratio == round(runs[(int(n), "aligntok")]["images_per_s"] / runs[(int(n), "imagefolder")]["images_per_s"], 3)
    assert [s["shards"] for s in report["sizes"]] == [1, 1] and report["sizes"][1]["shard_bytes"] > report["sizes"][0]["shard_bytes"]
    assert "| 700 |" in out.with_suffix(".md").read_text() and not list(tmp_path.glob("aligntok-datapath-*"))
