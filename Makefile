# Set-up on a fresh machine is part of every target: `make demo` and `make test` need nothing else.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.embedkit-installed

.PHONY: demo test bench clean

$(STAMP): pyproject.toml plugins/embedkit-text/pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The local CPU wheel first: anything that depends on torch then finds it satisfied.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[export,io,test]'
	$(BIN)/pip install -q -e plugins/embedkit-text
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/embedkit demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/text_cpu.py

clean:
	rm -rf $(VENV) models/*/
