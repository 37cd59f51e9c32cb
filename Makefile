# Two commands (see README "Quick start"):
#   make demo   create .venv, install, run the whole DVC pipeline on the bundled demo corpus
#   make test   create .venv, install, run the test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: demo test install clean

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# torch goes in first and pinned: an unpinned torch asked for by any package would pull a CUDA build.
$(VENV)/.installed: pyproject.toml | $(BIN)/activate
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[test]" torch==2.13.0
	$(BIN)/pip install --quiet --no-deps facenet-pytorch==2.6.0   # MTCNN weights only; its metadata pins an old torch
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/dvc repro
	$(BIN)/dvc metrics show

test: install
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) features models .cache dvclive
