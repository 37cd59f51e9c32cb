# Two commands (see README "Quick start"):
#   make demo   create .venv, install, run the whole DVC pipeline on the bundled demo corpus
#   make test   create .venv, install, run the test suite
# and one for maintainers (docs/experiments.md):
#   make baseline   regenerate the committed baseline (dvc.lock, metrics/, reports/summary.*) in a fresh clone of HEAD
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: demo test install baseline clean

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# torch goes in first and pinned: an unpinned torch asked for by any package would pull a CUDA build.
$(VENV)/.installed: pyproject.toml | $(BIN)/activate
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[test]" torch==2.13.0
	$(BIN)/pip install --quiet --no-deps facenet-pytorch==2.6.0   # MTCNN weights only; its metadata pins an old torch
	$(BIN)/python -m tools.plots_offline   # `dvc plots show/diff` pages with Vega inline: no CDN needed
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/dvc repro
	$(BIN)/dvc metrics show    # metrics/: one row per number, one column per model (the committed baseline: dvc metrics diff)

# Two workers, one test file each at a time (a module's shared fixtures, e.g. the end-to-end demo repro,
# are built once); the 10 slowest tests are printed at the end.
test: install
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=10

baseline: install
	$(BIN)/python -m tools.baseline

clean:
	rm -rf $(VENV) features models .cache dvclive
