# The two entry points a newcomer needs: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
CORRAL := $(VENV)/bin/corral

.PHONY: demo test unit integration install install-test bench clean

$(VENV)/.installed: pyproject.toml setup.py src/corral/dataplane/_fastpoll.c scripts/build-deps.sh
	test -x $(PY) || python3 -m venv $(VENV)
	./scripts/build-deps.sh $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: install
	$(PY) -m corral.lab.demo

test: install-test
	./scripts/system-deps.sh
	$(PY) -m mypy
	$(PY) -m pytest -q

unit: install-test
	$(PY) -m pytest -q tests/unit

integration: install-test
	./scripts/system-deps.sh
	$(PY) -m pytest -q tests/integration

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .mypy_cache src/corral/dataplane/*.so

bench: install
	$(PY) bench/convergence.py
	$(PY) bench/overlay.py
	$(PY) bench/zero_downtime.py
	$(PY) bench/rule_updates.py
	$(PY) bench/dataplane.py
