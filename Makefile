# Representation Workbench
#   make run    set up a virtual environment (first time) and start the app on the bundled sample models
#   make test   set up (first time) and run the whole test suite
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
# CPU machines take the CPU build of torch that pip finds locally; machines with an NVIDIA GPU may use any newer torch.
TORCH_SPEC := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo "torch>=2.4" || echo "torch==2.13.0")
PORT ?= 8501

.PHONY: setup run test lint benchmarks samples

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

run: setup
	$(VENV)/bin/workbench app --port $(PORT)

lint: setup
	$(VENV)/bin/ruff check workbench pages tests benchmarks sample_models examples app.py

test: setup lint  # WORKBENCH_UPDATE_SCREENSHOT=1 make test also refreshes docs/screenshot.png
	$(PY) -m pytest -q -p no:cacheprovider

benchmarks: setup
	for f in benchmarks/*.py; do $(PY) $$f || exit 1; done

samples: setup
	$(PY) sample_models/train.py
