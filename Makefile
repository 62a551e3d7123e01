# Two entry points (see README): `make demo` runs the main job, `make test` runs the tests.
# Each sets up .venv on first use. A torch already installed on the machine (e.g. a CUDA
# build) is reused through --system-site-packages; otherwise torch 2.13.0 is installed.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python

.PHONY: demo test setup clean

$(VENV)/.ready: pyproject.toml
	$(PY) -m venv --system-site-packages $(VENV)
	$(VPY) -c "import torch" 2>/dev/null || $(VPY) -m pip install -q torch==2.13.0
	$(VPY) -m pip install -q --no-build-isolation -e ".[dev]"
	touch $@

setup: $(VENV)/.ready

demo: $(VENV)/.ready
	$(VPY) -m compile_backend demo

test: $(VENV)/.ready
	$(VPY) -m pytest -q -p no:cacheprovider

clean:
	rm -rf $(VENV) build *.egg-info
