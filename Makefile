# Two commands set up a fresh machine (see README): `make quickstart` and `make test`.
# Everything installs into .venv; torch is installed first so pip keeps the CPU build
# (override TORCH_SPEC/TORCH_INDEX for a GPU machine, see README).

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
EXTRAS ?= dev,eval
PIP = $(VENV)/bin/python -m pip
STAMP = $(VENV)/.seedlm-installed-$(EXTRAS)

.PHONY: install quickstart test lint bench clean-venv

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(VENV)/bin/python
	$(PIP) install --quiet "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PIP) install --quiet -e ".[$(EXTRAS)]"
	touch $(STAMP)

install: $(STAMP)

quickstart: install
	$(VENV)/bin/seedlm train quickstart

# one test at a time: two pytest-xdist workers took the 2-core AMD EPYC VM from 38 to 29 min but made the suite
# flaky (free ports taken by the other worker's ranks, a SLURM signal landing before its run had started)
test: install
	HF_HUB_OFFLINE=1 DS_ACCELERATOR=cpu $(VENV)/bin/python -m pytest -q --durations=25 tests

bench: install
	HF_HUB_OFFLINE=1 DS_ACCELERATOR=cpu $(VENV)/bin/seedlm bench

lint: install
	$(VENV)/bin/ruff check seedlm model data_pipeline launch eval tests benchmarks

clean-venv:
	rm -rf $(VENV)
