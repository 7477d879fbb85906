# The two front-door commands (README): `make demo` and `make test`.
# Both create/update .venv from pyproject.toml; nothing else needs to be installed beforehand.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test venv clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# torch is installed on its own first so the pinned CPU build is picked up before anything
# else can ask the index for a newer (multi-GB CUDA) one.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet "torch==2.13.0"
	$(BIN)/pip install --quiet -e ".[test,peers]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/mntool demo --out demo-out

# MNTOOL_REQUIRE_DATA=1: a missing MovieLens-100k is fetched, else the tests needing it fail
# instead of skipping (tests/data_sources.py), so a green `make test` includes them.
# ruff first: lint and format check (pinned in pyproject, since formatter output changes between versions).
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	MNTOOL_REQUIRE_DATA=1 $(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) demo-out .pytest_cache
