# Two commands matter: `make demo` (serve the shipped models) and `make test` (the whole suite).
#
# The install follows pyproject.toml's extras. `make demo` installs only what serving needs
# (the base and one onnxruntime wheel: no torch, no test tools); `make install`, `make test`
# and `make artifacts` install everything. ORT picks the onnxruntime wheel: cpu (onnxruntime,
# the default: right for the demo and the tests on any host) or gpu (onnxruntime-gpu, for a
# CUDA host: `make test ORT=gpu`). onnxruntime supports only one of the two per environment,
# so installing one removes the other first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
ORT    ?= cpu
PORT   ?= 7860
PYTEST_ARGS ?= -m "not slow"

ifeq ($(filter $(ORT),cpu gpu),)
$(error ORT must be cpu or gpu, not '$(ORT)')
endif
WHEEL_cpu := onnxruntime
WHEEL_gpu := onnxruntime-gpu
OTHER_ORT := $(if $(filter cpu,$(ORT)),gpu,cpu)
# One stamp per install and wheel, so a second `make demo` or `make install` takes no time.
SERVE_STAMP := $(VENV)/.serve-$(ORT).stamp
FULL_STAMP  := $(VENV)/.full-$(ORT).stamp

# The demo's packages (no torch) install with uv, several times faster than pip: the uv on
# PATH, else one pip puts into the venv first (a few seconds); pip does it when neither
# works, or with USE_UV=0. Installs with torch always use pip: they rely on pip's own
# configuration (index, find-links, constraints), which uv does not read.
USE_UV ?= 1
UV     ?= $(shell command -v uv 2>/dev/null)
# serving/requirements.txt's pins (the Docker image's direct dependencies) constrain both
# installs, so the demo and the tests run the versions the image ships.
PINS := -c serving/requirements.txt

.PHONY: install install-serve test test-all lint docs demo artifacts clean

# The venv, without the other onnxruntime wheel: both ship the module `onnxruntime`, so remove
# both and let the install put back the one asked for.
define venv_for_ort
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@if $(BIN)/python -c 'import importlib.metadata as m; m.distribution("$(WHEEL_$(OTHER_ORT))")' 2>/dev/null; then \
	    echo "ORT=$(ORT): removing $(WHEEL_$(OTHER_ORT))"; \
	    $(BIN)/python -m pip uninstall --yes --quiet onnxruntime onnxruntime-gpu; \
	fi
	rm -f $(VENV)/.serve-$(OTHER_ORT).stamp $(VENV)/.full-$(OTHER_ORT).stamp $(VENV)/.install-stamp
endef

# Serving only: `toolkit serve` and serving/ (the base dependencies + the ORT wheel).
$(SERVE_STAMP): pyproject.toml serving/requirements.txt
	$(venv_for_ort)
	@uv='$(if $(filter 1,$(USE_UV)),$(UV))'; \
	if [ -z "$$uv" ] && [ '$(USE_UV)' = 1 ] && $(BIN)/python -m pip install --quiet uv; then \
	    uv=$(BIN)/uv; fi; \
	if [ -n "$$uv" ]; then \
	    echo "$$uv pip install --python $(BIN)/python $(PINS) -e '.[$(ORT)]'"; \
	    $$uv pip install --quiet --python $(BIN)/python $(PINS) -e '.[$(ORT)]' && exit 0; \
	    echo "uv failed: installing with pip"; fi; \
	echo "$(BIN)/python -m pip install $(PINS) -e '.[$(ORT)]'"; \
	$(BIN)/python -m pip install --quiet $(PINS) -e '.[$(ORT)]'
	touch $@

# Everything: training (torch), the ORT wheel and the test tools. It includes serving.
$(FULL_STAMP): pyproject.toml serving/requirements.txt
	$(venv_for_ort)
	$(BIN)/python -m pip install --quiet $(PINS) -e '.[train,$(ORT),dev]'
	touch $@ $(SERVE_STAMP)

install-serve: $(SERVE_STAMP)

install: $(FULL_STAMP)

lint: install
	$(BIN)/ruff check toolkit serving tests benchmarks docs/hooks.py
	$(BIN)/ruff format --check toolkit serving tests benchmarks docs/hooks.py

test: lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Everything, including the long tests (real training, the demo and Docker-equivalent venvs).
test-all: lint
	$(BIN)/python -m pytest

# The documentation site (docs/, mkdocs.yml) into site/; --strict: a broken link fails it.
docs: install
	$(BIN)/mkdocs build --strict --site-dir site

demo: install-serve
	$(BIN)/toolkit serve --artifacts artifacts --port $(PORT)

# Retrain, evaluate, export and package the shipped models from the real CIFAR-10 images.
# CIFAR10_DIR must point at train/ and test/ class folders (or leave it unset to download).
artifacts: install
	$(BIN)/python -m benchmarks.make_artifacts $(if $(CIFAR10_DIR),--data-dir $(CIFAR10_DIR))

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache site
