# Two commands do all set-up on a fresh machine:  `make test`  and  `make demo`.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
PYTEST_ARGS ?= -m "not gpu"

.PHONY: venv test test-fast demo bench gpu-wheels clean

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	# torch-fidelity's Inception port is used without torchvision (see evaluations/features.py).
	$(BIN)/pip install -q --no-deps -c constraints.txt torch-fidelity
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not gpu and not slow and not distributed and not slurm"

demo: $(STAMP)
	$(BIN)/python -m trainer.demo --run-dir runs/demo

# Benchmarks (minutes each on 2 CPU cores; results with machine and date in benchmarks/results/).
bench: $(STAMP)
	$(BIN)/python -m benchmarks.bench_diffusion
	$(BIN)/python -m benchmarks.bench_unet --preset 30M --batch 4 --threads 2
	$(BIN)/python -m benchmarks.bench_data
	$(BIN)/python -m benchmarks.bench_trainer
	$(BIN)/python -m benchmarks.bench_metrics
	$(BIN)/python -m benchmarks.bench_sampling --preset tiny16 --batch 16 --rounds 3

# What the lent GPU machine (no registry) lacks, as cp312 wheels in .whl/, checked complete; see benchmarks/gpu_check.sh.
gpu-wheels: $(STAMP)
	$(BIN)/python -m benchmarks.gpu_wheels --dest .whl

clean:
	rm -rf $(VENV) runs/demo .pytest_cache
