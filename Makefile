# `make demo` and `make test` work on a fresh machine: they create the
# virtualenv and install everything first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# torch is pinned to the CPU wheel; anything looser pulls a CUDA build.
TORCH_PIN ?= torch==2.13.0
BACKENDS ?= jax tensorflow torch
# The slowest tests are listed so that CI time creep shows where it comes from.
# Two workers per backend (pytest-xdist): most of the JAX suite's time is XLA
# compiling on one thread, so a second process nearly halves it on 2 cores.
PYTEST_ARGS ?= -n 2 --durations=15

.PHONY: install demo test test-jax test-tensorflow test-torch clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_PIN)" -e ".[jax,tensorflow,meta,plots,test,hub]"
	touch $(STAMP)

demo: install
	KERAS_BACKEND=$${KERAS_BACKEND:-jax} $(PY) examples/demo.py

# Runs the whole suite once per backend; fails if any backend fails.
test: install
	@failed=""; \
	for b in $(BACKENDS); do \
		echo "=== KERAS_BACKEND=$$b ==="; \
		KERAS_BACKEND=$$b $(PY) -m pytest -q $(PYTEST_ARGS) tests || failed="$$failed $$b"; \
	done; \
	if [ -n "$$failed" ]; then echo "FAILED on:$$failed"; exit 1; fi; \
	echo "All backends passed: $(BACKENDS)"

# One backend. Spelled out: make never applies a pattern rule to a .PHONY
# target, so `test-%` did nothing ("Nothing to be done for 'test-torch'").
test-jax test-tensorflow test-torch: install
	KERAS_BACKEND=$(@:test-%=%) $(PY) -m pytest -q $(PYTEST_ARGS) tests

clean:
	rm -rf $(VENV) build *.egg-info
