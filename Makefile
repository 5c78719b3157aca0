# The two commands. `make run`: the main job, dual-masking ECG pretraining on the real ECG shipped in the
# package (a run folder under runs/ with metrics and plots). `make test`: the test suite.
# Both create the virtual environment $(VENV) when it is missing, install CPU torch 2.13.0 into it unless it
# already has a torch, and (re)install the package when its sources changed; an editable (development)
# install is used as it is.

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
# e.g. https://download.pytorch.org/whl/cpu where the default index would give a CUDA build
TORCH_INDEX ?=
PYTEST_ARGS ?= -q

PY := $(VENV)/bin/python
SOURCES := pyproject.toml CMakeLists.txt $(shell find cbramod_fast csrc -type f -not -path '*/__pycache__/*' 2>/dev/null)

.PHONY: run test

run: $(VENV)/.installed
	$(VENV)/bin/cbramod-fast pretrain

test: $(VENV)/.installed $(VENV)/.test-extra
	$(VENV)/bin/pytest $(PYTEST_ARGS)

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# torch first: a bare `torch` requirement with no torch installed would pull a multi-GB CUDA build.
$(VENV)/.torch: | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH)"
	touch $@

$(VENV)/.installed: $(VENV)/.torch $(SOURCES)
	@if $(PY) -c "import importlib.metadata as m, json, sys; d = m.distribution('cbramod-fast').read_text('direct_url.json'); sys.exit(0 if d and json.loads(d).get('dir_info', {}).get('editable') else 1)" 2>/dev/null; \
	then echo "cbramod-fast is installed editable in $(VENV): using it as it is"; \
	else $(PY) -m pip install -q . ; fi
	touch $@

# The test extra's requirements, read from pyproject.toml (installing ".[test]" would build the package again).
$(VENV)/.test-extra: pyproject.toml | $(VENV)/.installed
	$(PY) -c "import sys; t = __import__('tomllib' if sys.version_info >= (3, 11) else 'pip._vendor.tomli', fromlist=['loads']); print('\n'.join(t.loads(open('pyproject.toml').read())['project']['optional-dependencies']['test']))" | $(PY) -m pip install -q -r /dev/stdin
	touch $@
