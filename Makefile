# Two commands: `make demo` (main job on the embedded default) and `make test` (the test suite;
# `make test-fast` skips its slow tiers).
# Both create .venv when missing, install the project, and prepare glad-mini and the demo data.
# `make lab` opens the notebooks in JupyterLab (LAB_PORT, LAB_ARGS: see README, "JupyterLab").
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch / torchvision pins; override e.g. TORCH_PINS="torch torchvision" for your platform's build.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.glad-installed
export MPLBACKEND ?= Agg
LAB_PORT ?= 8888
LAB_ARGS ?=
# Jupyter, IPython and matplotlib state kept inside the project (not in the home folder).
JUPYTER_ENV := JUPYTER_CONFIG_DIR=$(CURDIR)/.cache/jupyter/config JUPYTER_DATA_DIR=$(CURDIR)/.cache/jupyter/data \
	JUPYTER_RUNTIME_DIR=$(CURDIR)/.cache/jupyter/runtime IPYTHONDIR=$(CURDIR)/.cache/ipython \
	MPLCONFIGDIR=$(CURDIR)/.cache/matplotlib

.PHONY: install prepare demo test test-fast bench lab browser clean

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

# Chromium for the browser tests (tests/test_browser.py), where apt-get runs as root (CI); they skip without it.
browser:
	@if ! command -v chromium >/dev/null && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1 \
		|| { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends chromium >/dev/null; } \
		|| echo "chromium could not be installed: the browser tests will skip"; fi

test: prepare browser
	$(PY) -m pytest

# The edit-test loop: everything but the slow tiers (markers in pyproject.toml); `make test` is the full gate.
test-fast: prepare
	$(PY) -m pytest -m "not (notebook or cluster or browser or benchmark or slow)"

bench: prepare
	$(PY) -m benchmarks.run

# Bound to 127.0.0.1 with Jupyter's token kept: the browser opens on the URL that carries it.
# MPLBACKEND is left to the kernel (inline figures).
lab: prepare
	env -u MPLBACKEND $(JUPYTER_ENV) $(VENV)/bin/jupyter lab --ServerApp.ip=127.0.0.1 \
		--ServerApp.port=$(LAB_PORT) --ServerApp.root_dir=notebooks \
		$(if $(filter 0,$(shell id -u)),--ServerApp.allow_root=True) $(LAB_ARGS)

clean:
	rm -rf $(VENV) .cache
