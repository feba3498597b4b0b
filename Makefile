# One command sets up the environment (pinned CPU torch) and runs the tests; one runs the quickstart.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
WDM := $(VENV)/bin/wdmctl

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

# cache -> train -> sample -> fid on scikit-learn's bundled digits, on a CPU; rerunning resumes.
quickstart: $(VENV)/.installed
	$(WDM) cache digits --out caches/digits8 --resolution 8 --vae none
	$(WDM) train recipes/quickstart.toml
	$(WDM) sample --n 100 --class 0,1,2,3,4,5,6,7,8,9 --out samples/quickstart --overwrite
	$(WDM) fid --json --overwrite > samples/quickstart/fid.json
	@echo "grid: samples/quickstart/grid.png   FID: samples/quickstart/fid.json"

clean:
	rm -rf $(VENV) build *.egg-info
