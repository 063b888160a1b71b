# The two commands of the README: `make main` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: setup main test test-fast test-wheel docs bench reproduce study ramps gpu-check clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints/cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints/cpu.txt torch==2.13.0
	$(PIP) install -q -c constraints/cpu.txt -e ".[test,deepspeed,plot,bench,docs]"
	$(PY) tests/scripts/build_extensions.py
	touch $(STAMP)

main: setup
	$(VENV)/bin/legw-hf pretrain --output_dir runs/main

test: setup
	$(PY) -m pytest -q -n 2 --dist loadscope --no-loadscope-reorder -m "not wheel"

test-fast: setup
	$(PY) -m pytest -q -n 2 --dist loadscope --no-loadscope-reorder -m "not multiprocess and not wheel"

# The wheel built, installed into a fresh venv without extras, and run from outside the checkout, the main job at its
# default size included (about 12 minutes).
test-wheel: setup
	$(PY) -m pytest -q -m wheel tests/test_wheel.py

# The documentation site from docs/ into site/ (mkdocs.yml; strict: a broken link or a warning fails the build).
docs: setup
	$(VENV)/bin/mkdocs build --strict --quiet

bench: setup
	$(PY) benchmarks/optimizer_step.py
	$(PY) benchmarks/adascale_overhead.py

# The large-batch reproduction (benchmarks/results/), the optimizer step and the Trainer overhead: ~40 min on 2 cores.
reproduce: setup
	$(PY) benchmarks/large_batch.py
	$(PY) benchmarks/optimizer_step.py --quick > benchmarks/results/optimizer_step.md
	$(PY) benchmarks/trainer_overhead.py --json benchmarks/results/trainer_overhead.json \
		> benchmarks/results/trainer_overhead.md

# The BERT LR x batch study (benchmarks/results/bert_scaling.*): LAMB and AdamW, about an hour on 2 cores.
study: setup
	$(PY) benchmarks/bert_scaling.py

# Batch ramps (benchmarks/results/batch_ramp.*): fixed batches, a scheduled ramp and AutoRamp, ~30 min on 2 cores.
ramps: setup
	$(PY) benchmarks/batch_ramp.py

# On a CUDA machine, in an environment with a CUDA build of torch and `pip install -e '.[gpu,test]'`: the Triton
# kernels compiled and run for real against the reference path, then the GPU benchmark into benchmarks/results/.
GPU_PYTHON ?= python3
gpu-check:
	$(GPU_PYTHON) -m pytest -q tests/test_triton_kernel.py
	$(GPU_PYTHON) benchmarks/gpu_step.py --json benchmarks/results/gpu_step.json > benchmarks/results/gpu_step.md

clean:
	rm -rf $(VENV) runs site
