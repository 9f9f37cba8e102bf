# Two commands a new user needs: `make study` and `make test`. Both set everything up first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup system study test test-cluster lint bench clean

setup: system $(STAMP)

system:
	@bash scripts/setup_system.sh

# The lock pins every package; torch==2.13.0 resolves to the local CPU wheel on CPU machines.
$(STAMP): requirements/lock.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements/lock.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	$(PY) scripts/check_env.py
	@touch $@

study: setup
	$(VENV)/bin/ssl-study launch

# `make test`: everything but the real-cluster tests (14-20 min on 2 cores); `make test-cluster`: those
# (processes killed, two Ray nodes, a job on a Ray head, Hyperband: about 22 min). CI runs both.
test: setup
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -m "not cluster"

test-cluster: setup
	$(PY) -m pytest -q -m cluster

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) runs datasets
