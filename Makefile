# One entry point for people and CI. `make demo` and `make test` install what they need into .venv.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# aws-sam-cli pins old boto3: it lives in its own virtualenv, never in the project's.
SAM_VENV  := .tools/sam
SAM_STAMP := $(SAM_VENV)/.installed
SAM_CLI   := aws-sam-cli==1.170.0

.PHONY: demo test test-unit lint lint-infra install clean

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "$(PYTHON) not found: conveyor needs Python 3.11+" >&2; exit 1; }
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch is pinned (CPU build); installed first so nothing can pull an unpinned CUDA build.
	$(BIN)/pip install --quiet "torch==2.13.0"
	$(BIN)/pip install --quiet -e ".[local,train,dev]"
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/conveyor demo

test: $(STAMP) lint-infra
	$(BIN)/python -m pytest

$(SAM_STAMP):
	@test -x $(SAM_VENV)/bin/python || $(PYTHON) -m venv $(SAM_VENV)
	$(SAM_VENV)/bin/pip install --quiet "$(SAM_CLI)"
	@touch $(SAM_STAMP)

# The template must pass SAM's validator with its cfn-lint rules (offline).
lint-infra: $(SAM_STAMP)
	SAM_CLI_TELEMETRY=0 $(SAM_VENV)/bin/sam validate --lint --template template.yaml

test-unit: $(STAMP)
	$(BIN)/python -m pytest tests/unit

lint: $(STAMP)
	$(BIN)/ruff check src functions training tests
	$(BIN)/ruff format --check src functions training tests

clean:
	rm -rf $(VENV) .tools .pytest_cache build *.egg-info src/*.egg-info
