PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1

.PHONY: install test run bench proto

$(BIN)/python:
	$(PY) -m venv $(VENV)

install: $(BIN)/python
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[test]'
	PYTHON=$(BIN)/python tools/install-deploy-tools $(BIN)

test: install
	$(BIN)/pytest -q

run: install
	$(BIN)/dartserve serve

proto: install
	$(BIN)/python -m services.rpc.codegen

bench: install
	$(BIN)/dartserve bench prefill --json bench-prefill.json
