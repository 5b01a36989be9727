# steplog developer commands. Everything runs inside .venv, created on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# The CPU build of torch; an unpinned torch would pull a multi-GB CUDA build.
TORCH_PIN := torch==2.13.0

EXTRAS := dev,mlflow,clearml,torch,plot,demo,sb3,lightning,docs

.PHONY: install test lint docs bench demo clean constraints

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# constraints.txt holds the versions the suite passed with, so a new release of a dependency
# (an MLflow schema revision, say) changes nothing here until it has been tested.
$(STAMP): pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/python -m pip install --quiet "$(TORCH_PIN)"
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[$(EXTRAS)]'
	touch $(STAMP)

# Newest releases of every dependency, then the whole suite; only if it passes are they pinned.
# Until then the stamp is gone, so that an install after a failure (or an interruption) goes
# back to the pinned versions.
constraints: | $(BIN)/python
	rm -f $(STAMP)
	$(BIN)/python -m pip install --quiet --upgrade --upgrade-strategy eager "$(TORCH_PIN)" -e '.[$(EXTRAS)]'
	$(BIN)/python -m pytest
	$(BIN)/python -m pip freeze --exclude-editable > constraints.txt.freeze
	test -s constraints.txt.freeze
	{ sed -n '1,2p' constraints.txt; sed 's/^torch==\([0-9.]*\)+cpu$$/torch==\1/' \
	  constraints.txt.freeze; } > constraints.txt.new
	rm constraints.txt.freeze
	mv constraints.txt.new constraints.txt
	touch $(STAMP)

install: $(STAMP)

test: install
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy

# The documentation site (MkDocs, Material theme, API reference from the docstrings) into site/.
docs: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

bench: install
	$(BIN)/python benchmarks/bench_hot_path.py
	$(BIN)/python benchmarks/bench_file_sink.py
	$(BIN)/python benchmarks/bench_mlflow.py

demo: install
	$(BIN)/steplog demo

clean:
	rm -rf $(VENV) build dist site src/*.egg-info .pytest_cache .mypy_cache .ruff_cache steplog-demo
