# Every target sets itself up on a fresh machine: a virtual env, a CPU torch wheel when no GPU is
# present (so pip does not pull CUDA packages), then an editable install of worldgen, and Debian's chromium
# for the report's browser test (installed when missing and we are root with apt-get; else said and skipped).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TORCH_VERSION ?= 2.13.0

.PHONY: setup browser run test lint bench clean

setup: $(STAMP) browser

browser:
	@if command -v chromium >/dev/null 2>&1; then \
	  :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "setup: installing Debian's chromium (for the report's browser test)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	else \
	  echo "setup: chromium is missing and not installed here (that needs root and apt-get);" \
	    "the report's browser test will be skipped"; \
	fi

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	if command -v nvidia-smi >/dev/null 2>&1; then \
	  $(BIN)/python -m pip install --quiet torch; \
	else \
	  $(BIN)/python -m pip install --quiet torch==$(TORCH_VERSION); \
	fi
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

run: setup
	$(BIN)/worldgen run $(ARGS)

# The import contracts (pyproject's [tool.importlinter]: layers, no Ray in the core, no cycles in it) run
# first: a broken layer fails CI in seconds, before the suite's minutes.
test: setup
	$(BIN)/lint-imports
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

bench: setup
	for b in bench/*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
