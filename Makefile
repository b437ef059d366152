# Two commands on a fresh machine: `make demo` and `make test`. Both set everything up first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.personavec-installed

.PHONY: setup demo test test-slow bench clean

setup: $(STAMP)

# torch==2.13.0 first: it is the CPU build on this machine's disk; a bare `torch` would pull a CUDA build.
$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

demo: setup
	$(VENV)/bin/personavec demo

# The default suite: unit tests on tiny random models plus integration tests on smollm2-135m (fetched once).
test: setup
	$(PY) -m pytest -q

# Slower model tests, kept out of CI's default run. pytest exits 5 when no test is selected; that is not a failure here.
test-slow: setup
	$(PY) -m pytest -q -m slow; rc=$$?; [ $$rc -eq 5 ] && echo "no slow tests selected" && rc=0; exit $$rc

# steering-vectors pins transformers<5 but runs on 5, so it goes in without its dependencies.
bench: setup
	$(PY) -m pip install -q --disable-pip-version-check --no-deps steering-vectors==0.12.2
	$(PY) -m pip install -q --disable-pip-version-check scikit-learn
	$(PY) benchmarks/bench_core.py

clean:
	rm -rf $(VENV) runs
