# The README's two commands. Both bootstrap .venv: torch is pinned first because an
# unpinned torch pulls a multi-GB CUDA build (see DEVELOPERS.md).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: demo test install clean bench bench-venv

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	bash scripts/demo.sh

test: $(STAMP)
	$(BIN)/python -m pytest -q tests --durations=15

clean:
	rm -rf demo_out

# make bench: the benchmark harness (BENCHMARKS.md); make bench QUICK=1 is a few-step smoke run.
# torchtune gets a venv of its own (torch pinned first, as above).
TT_VENV := benchmarks/.venv-torchtune
TT_STAMP := $(TT_VENV)/.installed

$(TT_STAMP):
	$(PY) -m venv $(TT_VENV)
	$(TT_VENV)/bin/python -m pip install -q $(TORCH)
	$(TT_VENV)/bin/python -m pip install -q torchtune==0.6.1 torchao==0.11.0
	touch $(TT_STAMP)

bench-venv: $(TT_STAMP)

bench: $(STAMP) $(TT_STAMP)
	$(BIN)/python -m benchmarks.bench $(if $(QUICK),--quick --sizes tiny --repeats 1,)
