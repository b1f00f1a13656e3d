# Every target sets itself up on a fresh machine: a virtualenv with the CPU build of torch, then the package.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.fastgrpo-installed

.PHONY: demo test setup clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned: the CPU build on local disk; nothing afterwards may replace it with a CUDA build
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[test,trackio,plot]" "$(TORCH)"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/fastgrpo demo $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) demo-output .pytest_cache
