# mistral-tutorial: `make setup` once, then `make test`. Everything runs offline (HF_HUB_OFFLINE=1).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_VERBOSITY := error
export MPLBACKEND := Agg
export PYTHONHASHSEED := 0

.PHONY: setup install fetch notebooks test test-lib test-notebooks lab bench lint clean

## setup: venv + install (pinned CPU torch first) + fetch the model + run every notebook, refreshing figures/
setup: install fetch notebooks

install: $(STAMP)
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

fetch: $(STAMP)
	$(BIN)/mistral-tutorial fetch

## notebooks: execute every notebook headless, in place (outputs and figures/ refreshed)
notebooks: $(STAMP)
	$(BIN)/jupyter nbconvert --to notebook --execute --inplace --ExecutePreprocessor.timeout=1200 notebooks/[0-9]*.ipynb

## test: the whole suite: library parity tests, then nbval over every notebook
test: $(STAMP) fetch
	$(BIN)/python -m pytest -q tests notebooks --nbval-lax --durations=15

test-lib: $(STAMP) fetch
	$(BIN)/python -m pytest -q tests

test-notebooks: $(STAMP) fetch
	$(BIN)/python -m pytest -q notebooks --nbval-lax

lab: $(STAMP)
	$(BIN)/jupyter lab notebooks/

bench: $(STAMP) fetch
	$(BIN)/python benchmarks/bench_generate.py

lint: $(STAMP)
	$(BIN)/ruff check mistral_tutorial tests benchmarks scripts

clean:
	rm -rf $(VENV) .pytest_cache
