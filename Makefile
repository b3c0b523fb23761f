PY ?= python3
# PyPI's Linux torch wheel pulls several GB of CUDA libraries; this index has the CPU build,
# which pip prefers for torch==2.13.0 (2.13.0+cpu). Where pip already finds that build, the
# index may be unreachable: pip warns and goes on.
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1

.PHONY: install test-tools test run proto

$(BIN)/python:
	$(PY) -m venv $(VENV)

install: $(BIN)/python
	$(BIN)/pip install -q --no-deps --extra-index-url $(TORCH_INDEX) torch==2.13.0  # only torch asks that index
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0 -e '.[test]'

# What the tests need beyond Python packages: kubectl and docker-compose (tests/test_deploy.py)
# and a redis-server to start.
test-tools: install
	PYTHON=$(BIN)/python tools/install-deploy-tools $(BIN)
	tools/require-redis

test: install test-tools
	$(BIN)/pytest -q

run: install
	$(BIN)/dartserve serve

proto: install
	$(BIN)/python -m services.rpc.codegen

