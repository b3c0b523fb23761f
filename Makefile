PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1

.PHONY: install test run bench

$(BIN)/python:
	$(PY) -m venv $(VENV)

install: $(BIN)/python
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[test]'

test: install
	$(BIN)/pytest -q

run: install
	@echo "The HTTP gateway is not built yet. Meanwhile ask the bundled model from the CLI:"
	@echo "  $(BIN)/dartserve ask IMAGE.png 'What colour is the circle?' [--method dart --budget 64]"
	@$(BIN)/dartserve --help

bench: install
	$(BIN)/dartserve bench prefill --json bench-prefill.json
