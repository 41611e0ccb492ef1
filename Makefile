# One command to set up, one to test. The venv lives in .venv/ in the repo root.
PYTHON ?= python3
VENV := .venv
PIP := $(VENV)/bin/pip

.PHONY: setup test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	# torch first and pinned: the CPU wheel; anything unpinned would pull a CUDA build.
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "torch==2.13.0"
	$(PIP) install --quiet -e ".[dev]"
	touch $@

test: setup
	$(VENV)/bin/python -m pytest -q

bench: setup
	$(VENV)/bin/python bench/run.py

clean:
	rm -rf $(VENV) .pytest_cache
