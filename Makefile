# Two commands on a fresh machine: `make run` (main pipeline on the embedded data) and `make test`.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export DO_NOT_TRACK ?= 1
export RAY_USAGE_STATS_ENABLED ?= 0

.PHONY: install run lint test test-fast gpu-check bench bench-quick lock clean stack-up stack-down

$(VENV)/.installed: pyproject.toml requirements.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c requirements.lock -e ".[dev]"
	touch $@

install: $(VENV)/.installed

run: install
	$(VENV)/bin/tl run

# style and declared dependencies (configured in pyproject.toml); `make test` runs it first
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/deptry .

test: install lint
	$(PY) -m pytest

test-fast: install
	$(PY) -m pytest -m "not slow and not gpu"

# on a machine with a CUDA GPU (about 5 min): the gpu-marked tests, then a short `tl run` of resnet18 at 224 on the
# GPU in a copy of the project; prints images/s, the GPU memory peak and the precision; exits 2 without a GPU
gpu-check: install
	$(PY) -m bench.gpu_check

# the shared stack on this machine (S3, MLflow, Prefect + worker, Ray head); ports in infra/stack.env, credentials
# made per stack in .tlstack/secrets.env
stack-up: install
	$(VENV)/bin/tl stack up

stack-down:
	$(VENV)/bin/tl stack down

# every number in docs/benchmarks.md comes from these scripts
bench: install
	$(PY) -m bench.transfer
	$(PY) -m bench.compress
	$(PY) -m bench.throughput
	$(PY) -m bench.throughput --backbone resnet18
	$(PY) -m bench.pipeline
	$(PY) -m bench.selection
	$(PY) -m bench.failure_signal --seeds 3
	$(PY) -m bench.data_scale

bench-quick: install
	$(PY) -m bench.transfer --quick
	$(PY) -m bench.selection --quick

# refresh the exact resolved versions after changing dependencies in pyproject.toml
lock: install
	$(PY) -m pip freeze --exclude-editable | grep -v '^-e' > requirements.lock

clean:
	rm -rf $(VENV) .pytest_cache
