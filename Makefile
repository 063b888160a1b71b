# The two commands of the README: `make main` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: setup main test test-fast bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints/cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints/cpu.txt torch==2.13.0
	$(PIP) install -q -c constraints/cpu.txt -e ".[test,deepspeed,plot]"
	touch $(STAMP)

main: setup
	$(VENV)/bin/legw-hf plan --base-batch 1024 --base-lr 5.656854249492381 --base-warmup-epochs 0.3125 \
		--epochs 90 --dataset-size 1281167 --batch 1024 --batch 4096 --batch 32768 --decay poly --power 2
	$(PY) examples/run_mlm.py --output_dir runs/quickstart \
		--legw_base_batch_size 16 --learning_rate 1e-3 --legw_base_warmup_epochs 0.1 \
		--per_device_train_batch_size 32 --gradient_accumulation_steps 2 --num_train_epochs 2 \
		--max_train_samples 2048 --logging_steps 4 --save_strategy no --report_to none --disable_tqdm true

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not multiprocess"

bench: setup
	$(PY) benchmarks/optimizer_step.py

clean:
	rm -rf $(VENV) runs
