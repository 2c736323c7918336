# make reproduce: every committed result; make test: the CPU test suite. Both create .venv first.
SHELL := /bin/bash
PY := .venv/bin/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export WANDB_MODE ?= offline
export PYTHONHASHSEED := 0

.PHONY: venv test reproduce reproduce-toy2d reproduce-table4 reproduce-table4-quick toy2d-weights shapes-prior bench clean
PRIOR ?= sd21

venv: .venv/.installed

.venv/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[slurm,dev]"
	touch $@

test: venv
	WANDB_MODE=disabled $(PY) -m pytest -q tests

reproduce: reproduce-toy2d reproduce-table4-quick

reproduce-toy2d: venv
	$(PY) -m eval.reproduce_toy2d
	$(PY) -m eval.gradient_quality
	$(PY) -m eval.landscapes
	$(PY) -m eval.toy2d_figures

# Table 4 (text-to-2D FID vs iterations): PRIOR=sd21 (GPU node with the weights) or PRIOR=shapes (this CPU)
reproduce-table4: venv
	$(PY) -m eval.reproduce_table4 --prior $(PRIOR) $(if $(INCEPTION),task.eval.inception_path=$(INCEPTION)) $(TABLE4_ARGS)

reproduce-table4-quick: venv
	$(PY) -m eval.reproduce_table4 --prior shapes --quick

shapes-prior: venv
	$(PY) -m experiments.train_shapes --iterations 1800

bench: venv
	$(PY) -m eval.bench_gmm

toy2d-weights: venv
	$(PY) -m experiments.train_toy2d

clean:
	rm -rf outputs multirun .pytest_cache
