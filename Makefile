# Two commands on a fresh machine:  `make serve`  (the platform on its embedded defaults)
#                                   `make test`   (lint, types, the whole suite on SQLite and PostgreSQL)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PG_TEST_URL ?= postgresql://postgres@127.0.0.1:5432/test
HOST ?= 127.0.0.1
PORT ?= 8080

.PHONY: install sandbox serve test lint unit bench clean contracts

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

# bubblewrap isolates service-mode spells; without it service runs are refused (fail closed).
sandbox:
	@command -v bwrap >/dev/null 2>&1 || { \
	  echo "installing bubblewrap (needs root / sudo)"; \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq bubblewrap; \
	  else sudo apt-get update -qq && sudo apt-get install -y -qq bubblewrap; fi; }

serve: install sandbox
	$(VENV)/bin/spell serve --host $(HOST) --port $(PORT)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy --strict app/
	$(VENV)/bin/actionlint .github/workflows/*.yml templates/workflows/*.yml
	$(VENV)/bin/check-jsonschema --builtin-schema vendor.github-workflows .github/workflows/*.yml templates/workflows/*.yml
	$(VENV)/bin/check-jsonschema --builtin-schema vendor.github-actions actions/*/action.yml action.yml

# GitHub's OpenAPI description and webhook examples, Stripe's OpenAPI spec (npm): contract tests
# validate against them. Installed into .cache/contracts, never committed.
contracts:
	bash tests/fixtures/install_contracts.sh

test: install sandbox lint contracts
	@echo "== test suite on SQLite (embedded default)"
	@# SPELL_TEST_PASS=sqlite: tests that pick PostgreSQL themselves wait for the second pass
	SPELL_TEST_PASS=sqlite $(PY) -m pytest -q -p no:cacheprovider
	@echo "== test suite on PostgreSQL ($(PG_TEST_URL))"
	SPELL_TEST_DATABASE_URL=$(PG_TEST_URL) $(PY) -m pytest -q -p no:cacheprovider

unit: install
	$(PY) -m pytest -q -p no:cacheprovider tests/unit

bench: install sandbox
	$(PY) bench/run_all.py

clean:
	rm -rf $(VENV) .spell .mypy_cache .ruff_cache
