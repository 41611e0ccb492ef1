# One command to set up, one to test. The venv lives in .venv/ in the repo root.
PYTHON ?= python3
VENV := .venv
PIP := $(VENV)/bin/pip

.PHONY: setup test bench clean

setup: $(VENV)/.installed wordnet chromium

# WordNet 3.0 dict files for caption synonym augmentation (mmtag.augment); Debian's wordnet-base
# puts them in /usr/share/wordnet. Best effort: without apt or root it only warns.
.PHONY: wordnet
wordnet:
	@test -f /usr/share/wordnet/index.noun || test -n "$$MMTAG_WORDNET" || { \
	  command -v apt-get >/dev/null && \
	  (apt-get install -y -q --no-install-recommends wordnet-base || \
	   (apt-get update -q && apt-get install -y -q --no-install-recommends wordnet-base)) || \
	  echo "warning: could not install wordnet-base; caption synonym augmentation needs it" \
	       "(run 'sudo apt-get install wordnet-base' or set MMTAG_WORDNET to a WordNet 3.0 dict dir)"; }

# Headless Chromium for the web page's browser test (tests/test_serve.py), driven by Playwright's
# Python client with executable_path. Best effort: without apt or root the test skips and says why.
.PHONY: chromium
chromium:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || { \
	  command -v apt-get >/dev/null && \
	  (apt-get install -y -q --no-install-recommends chromium || \
	   (apt-get update -q && apt-get install -y -q --no-install-recommends chromium)) || \
	  echo "warning: could not install chromium; the browser test will be skipped" \
	       "(run 'sudo apt-get install chromium')"; }

$(VENV)/.installed: pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	# torch first and pinned: the CPU wheel; anything unpinned would pull a CUDA build.
	$(PIP) install --quiet "torch==2.13.0"
	$(PIP) install --quiet -e ".[dev]"
	touch $@

test: setup
	$(VENV)/bin/python -m pytest -q

# Benchmarks need ../shared/data; they print tables (see README, "Results").
bench: setup
	$(VENV)/bin/python bench/foundation.py

clean:
	rm -rf $(VENV) .pytest_cache
