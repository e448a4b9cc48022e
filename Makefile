# Every target installs what it needs into .venv first (re-installed when pyproject.toml changes).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install test test-fast demo bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

# The unit and component tests only: everything but the end-to-end runs marked `slow` (Ray jobs, training).
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

demo: $(STAMP)
	$(PY) jobs/demo.py --out outputs/demo

bench: $(STAMP)
	$(PY) bench/model.py

# Every headline figure on one GPU in one call, next to the goals (bench/gpu_check.py's header has the
# whole recipe). With .venv (no CUDA here) it runs the reduced CPU check; on a bare GPU machine it first
# installs the wheels carried in .whl/ (../shared/tools/gpu-wheels.sh), with no network.
.PHONY: gpu-check
GPU_CHECK_ARGS ?=
gpu-check:
	@if [ -x $(PY) ]; then py=$(PY); else py=python3; \
	  if ls .whl/*.whl >/dev/null 2>&1; then \
	    python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl || exit 1; \
	    export PYTHONPATH=/tmp/site$${PYTHONPATH:+:$$PYTHONPATH}; fi; fi; \
	export RAY_AUTH_MODE=disabled TORCH_CUDA_ARCH_LIST=9.0 PYTHONUNBUFFERED=1; \
	$$py bench/gpu_check.py $(GPU_CHECK_ARGS)

clean:
	rm -rf outputs .pytest_cache
