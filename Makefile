# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create (or reuse) the virtualenv in $(VENV), install torch first (a CPU build
# here), then the package with its extras, then do their job.
VENV ?= .venv
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.scvi_ext_installed

.PHONY: demo test lint install clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev,bench,soma]"
	# CELLULAR's reference package, a peer of the throughput benchmark, pins old versions
	# of everything it imports; it runs on the versions installed above.
	$(BIN)/python -m pip install -q --no-deps "CELLULAR-CL==0.0.4"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/scvi-ext demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
