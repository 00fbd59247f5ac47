# Two commands: `make demo` (main job on the embedded default) and `make test` (the test suite).
# Both create .venv when missing, install the project, and prepare glad-mini and the demo data.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch / torchvision pins; override e.g. TORCH_PINS="torch torchvision" for your platform's build.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.glad-installed
export MPLBACKEND ?= Agg

.PHONY: install prepare demo test bench lab clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m ipykernel install --prefix $(VENV) --name glad --display-name "glad (.venv)" >/dev/null
	touch $(STAMP)

install: $(STAMP)

prepare: install
	$(PY) -m glad_core prepare

demo: prepare
	$(PY) -m glad_core demo

test: prepare
	$(PY) -m pytest

bench: prepare
	$(PY) benchmarks/run.py

lab: prepare
	$(VENV)/bin/jupyter lab notebooks/

clean:
	rm -rf $(VENV) .cache
