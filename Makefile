PY ?= python3
# PyPI's Linux torch wheel pulls several GB of CUDA libraries; this index has the CPU build,
# which pip prefers for torch==2.13.0 (2.13.0+cpu). Where pip already finds that build, the
# index may be unreachable: pip warns and goes on.
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
VENV := .venv
BIN := $(VENV)/bin
# pip runs again only when the requirements change: each stamp is older than them then.
SERVE_STAMP := $(VENV)/.installed-serve
TEST_STAMP := $(VENV)/.installed-test
export HF_HUB_OFFLINE := 1

.PHONY: install test-tools test run proto docs

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(SERVE_STAMP): pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/pip install -q --no-deps --extra-index-url $(TORCH_INDEX) torch==2.13.0  # only torch asks that index
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0 -e .
	touch $@

$(TEST_STAMP): $(SERVE_STAMP)
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0 -e '.[test]'
	touch $@

install: $(SERVE_STAMP)

# What the tests need beyond Python packages: kubectl and docker-compose (tests/test_deploy.py)
# and a redis-server to start.
test-tools: $(TEST_STAMP)
	PYTHON=$(BIN)/python tools/install-deploy-tools $(BIN)
	tools/require-redis

test: test-tools
	$(BIN)/pytest -q

run: $(SERVE_STAMP)
	$(BIN)/dartserve serve

proto: $(TEST_STAMP)
	$(BIN)/python -m services.rpc.codegen

# docs/configuration.md from the settings' declarations in services/config.py.
docs: $(SERVE_STAMP)
	$(BIN)/python -m services.settings_doc > docs/configuration.md
