# Two commands for a fresh machine: `make quickstart` and `make test`.
# Each creates .venv if missing, installs torch==2.13.0 first (a local file on the CPU machines here, the
# normal wheel elsewhere), then lmlab with its pinned dependencies. --no-compile: pip would byte-compile
# every installed file (most of the install's CPU time on 2 cores); Python caches the bytecode of what it
# imports instead, which needs writing bytecode on (some environments, CI's images among them, turn it off:
# then every process would compile torch and transformers again, 6 s more per `import lmlab`).
unexport PYTHONDONTWRITEBYTECODE
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.lmlab-installed

.PHONY: install quickstart test test-all test-gpu clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q --no-compile torch==2.13.0
	$(PY) -m pip install -q --no-compile -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

quickstart: install
	$(PY) -m lmlab.quickstart

# Two pytest-xdist workers (one per core here); a test module stays on one worker, so its module fixtures
# (a trained run, say) are built once.
XDIST := -n 2 --dist loadscope

test: install
	$(PY) -m pytest -q $(XDIST)

test-all: install
	$(PY) -m pytest -q $(XDIST) -m 'not gpu'

test-gpu: install
	$(PY) -m pytest -q -m gpu

clean:
	rm -rf $(VENV) exp/quickstart
