# `make demo` and `make test` work on a fresh machine with only Python 3: the venv is built here.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.requirements-installed
# The GLUE TSVs beside the checkout when present; otherwise the demo tries the datasets hub.
GLUE_DIR ?= $(abspath $(wildcard ../shared/data/glue))
export GLUE_DIR

.PHONY: venv test demo clean

venv: $(STAMP)

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $(STAMP)

test: $(STAMP)
	# Two workers (pytest-xdist): about 15 min on 2 cores, against 20 in one process.
	$(PY) -m pytest -q -n 2 tests

demo: $(STAMP)
	$(PY) -m train.demo --config configs/demo.py $(DEMO_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
