# One command sets up the environment (pinned CPU torch) and runs the tests; one runs the quickstart.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0

.PHONY: install test test-gpu quickstart clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

test: $(VENV)/.installed
	$(PY) -m pytest -q -n 2 --durations=15

test-gpu:
	python -m pytest -q -m gpu

quickstart: $(VENV)/.installed
	$(VENV)/bin/wdmctl quickstart

clean:
	rm -rf $(VENV) build *.egg-info
