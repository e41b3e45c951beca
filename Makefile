# Two commands matter: `make demo` (serve the shipped models) and `make test` (the whole suite).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.install-stamp
PYTEST_ARGS ?= -m "not slow"

.PHONY: install test test-all lint demo artifacts clean

# Re-install only when the dependencies change; a second `make install` takes no time.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

lint: install
	$(BIN)/ruff check toolkit serving tests benchmarks
	$(BIN)/ruff format --check toolkit serving tests benchmarks

test: lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Everything, including the long tests (real training, the Docker-equivalent venv build).
test-all: lint
	$(BIN)/python -m pytest

demo: install
	$(BIN)/toolkit serve --artifacts artifacts

# Retrain, evaluate, export and package the shipped models from the real CIFAR-10 images.
# CIFAR10_DIR must point at train/ and test/ class folders (or leave it unset to download).
artifacts: install
	$(BIN)/python -m benchmarks.make_artifacts $(if $(CIFAR10_DIR),--data-dir $(CIFAR10_DIR))

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
