# Every target installs what it needs, idempotently. The virtualenv lives outside the checkout so that
# fresh clones (CI) reuse it; the install is redone when a pyproject.toml or the checkout path changes.
# Two editable distributions: moeplace (operator/, agent/) and the local dev stack moeplace-dev (dev/).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= $(HOME)/.cache/moeplace/venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml dev/pyproject.toml | sha1sum | cut -c1-12)-$(shell echo $(CURDIR) | sha1sum | cut -c1-12)
PYTEST_ARGS ?=

.PHONY: setup system-deps generate engines-env demo bench test test-unit clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP): | $(PY)
	rm -f $(VENV)/.installed-*
	$(PY) -m pip install -q -e '.[agent,test,plot]' -e ./dev
	touch $@

setup: $(STAMP)

system-deps:
	scripts/system-deps.sh

# The CRD (crds/ and the chart's copy) and README's manifest reference, from the operator's models.
generate: setup
	$(PY) -m moeplace_dev.generate

# SGLang's and vLLM's Python code for tests/engines (cached; those tests skip when it cannot be built)
engines-env: setup
	scripts/engines-env.sh $(VENV) >/dev/null || echo "engines-env: not built; tests/engines will skip" >&2

demo: setup system-deps
	$(VENV)/bin/moeplace demo --out out/demo

bench: setup
	$(VENV)/bin/moeplace bench --trace ../shared/traces/esft_lite_intent_law_top6.npz \
		--model deepseek-v2-lite --topology 2x4 --redundant-slots 16 --json out/bench-esft.json

test: setup system-deps engines-env
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-unit: setup
	$(PY) -m pytest -q tests/unit $(PYTEST_ARGS)

clean:
	rm -rf out .pytest_cache .hypothesis
