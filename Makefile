# The two commands of the README. Both create or refresh .venv (keyed on pyproject.toml and this
# Makefile) so they work on a fresh machine with nothing installed by hand.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: test demo lint venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(VENV)/bin/ruff check pact tests
	HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 $(PY) -m pytest -n 2 $(PYTEST_ARGS)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pact demo

lint: $(STAMP)
	$(VENV)/bin/ruff check pact tests
	$(VENV)/bin/ruff format --check pact tests

clean:
	rm -rf $(VENV) outputs
