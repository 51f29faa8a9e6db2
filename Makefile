# Quickstart: `make run` (the whole pipeline on this machine), `make test` (the test suite), `make lint` (ruff).
# Both create and fill the virtualenv (.venv) on first use.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Datasets: ./data, or ../shared/data beside this checkout when ./data is absent; override with DATA_ROOT=...
DATA_ROOT ?= $(if $(wildcard ./data),./data,$(if $(wildcard ../shared/data),../shared/data,./data))
# Offline ImageNet weights when ../shared/torch_home exists; otherwise torchvision's usual cache (downloads once).
export TORCH_HOME ?= $(if $(wildcard ../shared/torch_home),$(abspath ../shared/torch_home),$(HOME)/.cache/torch)
CONFIG ?= cpu

.PHONY: venv run test lint format ingest compile clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

venv: $(BIN)/.installed

run: venv
	$(BIN)/d2mtl run --config $(CONFIG) --data-root $(DATA_ROOT)

test: venv
	$(BIN)/python -m pytest -q

# ruff's settings are in pyproject.toml; `make format` rewrites the files that `make lint` says are unformatted
lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: venv
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

ingest: venv
	$(BIN)/d2mtl ingest --config $(CONFIG) --data-root $(DATA_ROOT) --out runs/manual/ingest

compile: venv
	$(BIN)/d2mtl compile --config $(CONFIG) --out pipeline.yaml

clean:
	rm -rf $(VENV) runs .pytest_cache

-include mk/*.mk
