# The two commands of the README. Both create or refresh .venv (keyed on the lock, pyproject.toml and
# this Makefile) so they work on a fresh machine with nothing installed by hand.
#
# .venv is installed from requirements.lock: every distribution (direct or transitive) at an exact
# version with its sha256, for CPython 3.11 on Linux x86-64. `make lock` regenerates it from
# pyproject.toml; do that on purpose only (README, "Refreshing the lock").
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
PY := $(VENV)/bin/python
LOCK := requirements.lock
PYTEST_ARGS ?=
# The resolver used by `make lock` lives in its own venv so that it is never part of .venv.
UV_VERSION := 0.13.9
LOCKENV := .venv-lock
# The lock's target: the interpreter and platform below. Other platforms install from pyproject's
# ranges instead (a warning says so); the lock does not describe them.
LOCK_PYTHON := 3.11
LOCK_PLATFORM := x86_64-manylinux_2_28
# Build and installer tools, locked with everything else (the editable install runs without build
# isolation so that setuptools is the locked one, not whatever is newest that day).
LOCK_TOOLS := 'pip' 'setuptools>=77'

.PHONY: test demo lint venv lock clean

venv: $(STAMP)

$(STAMP): $(LOCK) pyproject.toml Makefile
	@# A changed lock rebuilds .venv from scratch, so that packages the lock dropped go too.
	@if [ -d $(VENV) ] && echo ' $? ' | grep -q ' $(LOCK) '; then echo "$(LOCK) changed: rebuilding $(VENV)"; rm -rf $(VENV); fi
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@if $(PY) -c 'import platform, sys; sys.exit(not (sys.version_info[:2] == (3, 11) and platform.system() == "Linux" and platform.machine() == "x86_64"))'; then \
		echo "installing the locked environment ($(LOCK))"; \
		$(PY) -m pip install --quiet --no-compile --require-hashes --no-deps -r $(LOCK) && \
		$(PY) -m pip install --quiet --no-compile --no-deps --no-build-isolation -e . ; \
	else \
		echo "warning: $(LOCK) is for CPython $(LOCK_PYTHON) on Linux x86-64; this interpreter is not," \
		     "so .venv gets pyproject.toml's ranges (not the locked versions)" >&2; \
		$(PY) -m pip install --quiet -e '.[dev]' ; \
	fi
	touch $(STAMP)

test: $(STAMP)
	$(VENV)/bin/ruff check pact tests
	HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 $(PY) -m pytest -n 2 $(PYTEST_ARGS)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pact demo

lint: $(STAMP)
	$(VENV)/bin/ruff check pact tests
	$(VENV)/bin/ruff format --check pact tests

# Resolve pyproject.toml (with the dev and eval extras) to exact versions and hashes. Run it after
# changing a dependency in pyproject.toml, or on purpose to move to newer releases; then `make test`.
lock:
	test -x $(LOCKENV)/bin/uv || ($(PYTHON) -m venv $(LOCKENV) && $(LOCKENV)/bin/pip install --quiet uv==$(UV_VERSION))
	printf '%s\n' $(LOCK_TOOLS) | $(LOCKENV)/bin/uv pip compile pyproject.toml - --extra dev --extra eval \
		--generate-hashes --python-version $(LOCK_PYTHON) --python-platform $(LOCK_PLATFORM) \
		--custom-compile-command 'make lock' --quiet --output-file $(LOCK)

clean:
	rm -rf $(VENV) $(LOCKENV) outputs
