# The README's two commands. Both bootstrap .venv with the exact versions in constraints.txt
# (the set the suite last passed with); torch is installed first because an unpinned torch
# pulls a multi-GB CUDA build.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
LOCK := constraints.txt
TORCH := $(shell grep '^torch==' $(LOCK))
STAMP := $(VENV)/.installed
# PIP_CONSTRAINT (not -c) also reaches the isolated environment that builds this package
LOCKED := PIP_CONSTRAINT=$(abspath $(LOCK))

.PHONY: demo test install clean bench bench-venv test-latest lock test-floor

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml $(LOCK)
	$(LOCKED) $(BIN)/python -m pip install -q --upgrade pip
	$(LOCKED) $(BIN)/python -m pip install -q $(TORCH)
	$(LOCKED) $(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	bash scripts/demo.sh

test: $(STAMP)
	$(BIN)/python -m pytest -q tests --durations=25

clean:
	rm -rf demo_out

# make test-latest: the suite against the newest releases of every dependency but torch
# (held at the pin by a one-line constraint: a newer torch from the registry is the multi-GB
# CUDA build), in a venv of its own, rebuilt each time. Its versions are in .venv-latest/versions.txt; if the suite passes, `make lock`
# makes them the tested set. An upgrade is a deliberate, tested change.
LATEST := .venv-latest

test-latest:
	rm -rf $(LATEST)
	$(PY) -m venv $(LATEST)
	echo '$(TORCH)' > $(LATEST)/torch-pin.txt
	$(LATEST)/bin/python -m pip install -q --upgrade pip setuptools
	PIP_CONSTRAINT=$(abspath $(LATEST))/torch-pin.txt $(LATEST)/bin/python -m pip install -q $(TORCH) -e '.[test]'
	$(LATEST)/bin/python -m pip freeze --exclude-editable | sed 's/^\(torch==[^+]*\)+.*/\1/' > $(LATEST)/versions.txt
	$(LATEST)/bin/python -m pip list --format freeze | grep -E '^(pip|setuptools)==' >> $(LATEST)/versions.txt
	$(LATEST)/bin/python -m pytest -q tests --durations=25

lock:
	test -f $(LATEST)/versions.txt || { echo "run make test-latest first"; exit 1; }
	{ sed -n '/^#/p' $(LOCK); cat $(LATEST)/versions.txt; } > $(LOCK).new && mv $(LOCK).new $(LOCK)

# make test-floor: the oldest torch pyproject.toml admits, with the locked versions of
# everything else, on a subset that covers the code paths torch's API shapes (2-rank FSDP2,
# DCP resume at another world size, CPU offload with activation checkpointing, and the unit
# tests but those that check a private API at the pinned torch, marked `pinned`). The
# registry's torch for x86_64 Linux is a CUDA build: the venv takes 7.7 GB.
FLOOR := .venv-floor
TORCH_FLOOR := $(shell sed -n 's/.*"torch>=\([0-9.]*\)".*/torch==\1/p' pyproject.toml)
FLOOR_TESTS := tests/unit \
	tests/integration/test_loss.py::test_two_ranks_same_loss_and_gradients \
	tests/integration/test_resume.py::test_saved_at_two_ranks_resumes_at_one \
	tests/integration/test_fsdp_options.py::test_memory_flags_do_not_change_losses

test-floor:
	test -x $(FLOOR)/bin/python || $(PY) -m venv $(FLOOR)
	grep -v '^torch==' $(LOCK) > $(FLOOR)/constraints.txt
	PIP_CONSTRAINT=$(abspath $(FLOOR))/constraints.txt $(FLOOR)/bin/python -m pip install -q '$(TORCH_FLOOR)'
	PIP_CONSTRAINT=$(abspath $(FLOOR))/constraints.txt $(FLOOR)/bin/python -m pip install -q -e '.[test]'
	CUDA_VISIBLE_DEVICES= $(FLOOR)/bin/python -m pytest -q -m "not pinned" $(FLOOR_TESTS)

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

# the bench extra: what only the benchmark runs (TRL's DPOTrainer, the DPO section's baseline)
BENCH_STAMP := $(VENV)/.installed-bench

$(BENCH_STAMP): $(STAMP)
	$(LOCKED) $(BIN)/python -m pip install -q -e '.[test,bench]'
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP) $(TT_STAMP)
	$(BIN)/python -m benchmarks.bench $(if $(QUICK),--quick --sizes tiny --repeats 1,)
