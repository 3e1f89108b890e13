# Quick start: `make demo` (train the tiny model, print a sample) and `make test`.
# Both create .venv with a Python >= 3.12 found on PATH or under pyenv, and install the project into it.

VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
WORKDIR ?= runs/demo
PYTEST_ARGS ?=

.PHONY: demo test lint test-slow bench clean

$(STAMP): setup.py
	@set -e; \
	if [ ! -x "$(PY)" ]; then \
	  interp=$$(scripts/find_python.sh); \
	  echo "creating $(VENV) with $$interp"; \
	  "$$interp" -m venv $(VENV); \
	fi; \
	$(PY) -m pip install -q --upgrade pip; \
	$(PY) -m pip install -q -e '.[test]'; \
	touch $(STAMP)

demo: $(STAMP)
	JAX_PLATFORMS=$${JAX_PLATFORMS:-cpu} $(PY) -m kimi_jax.train --config configs/tiny.py --workdir $(WORKDIR)

test: $(STAMP)
	JAX_PLATFORMS=$${JAX_PLATFORMS:-cpu} $(PY) -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

test-slow: $(STAMP)
	$(PY) -m pip install -q -e '.[test,notebook,bench]'
	JAX_PLATFORMS=$${JAX_PLATFORMS:-cpu} $(PY) -m pytest -q -m slow $(PYTEST_ARGS)

bench: $(STAMP)
	JAX_PLATFORMS=$${JAX_PLATFORMS:-cpu} $(PY) benchmarks/train_step.py

clean:
	rm -rf $(VENV) runs
