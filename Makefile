PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test lint demo bench clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/pytest

demo: $(STAMP)
	$(BIN)/kiln demo --out demo-output

bench: $(STAMP)
	$(BIN)/python bench/train.py
	$(BIN)/python bench/label.py
	$(BIN)/python bench/generate.py
	$(BIN)/python bench/tune.py
	$(BIN)/python bench/finetune.py
	$(BIN)/python bench/scale.py
	$(BIN)/python bench/review.py

clean:
	rm -rf demo-output .pytest_cache
