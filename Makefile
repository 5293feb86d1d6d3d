# Thin wrappers: every target is `python3 tasks.py <target>` (tasks.py needs nothing but Python >= 3.10).
PYTHON ?= python3

.PHONY: setup install fetch notebooks test lab site bench lint
setup install fetch notebooks test lab site bench:
	$(PYTHON) tasks.py $@

lint:
	.venv/bin/ruff check mistral_tutorial tests benchmarks scripts tasks.py
