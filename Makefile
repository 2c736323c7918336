# make reproduce: every committed result (but the spiral / pinwheel toy tables: make reproduce-toy2d-datasets);
# make test: the CPU test suite without the tests marked slow; make test-full: all of it. Both create .venv first.
SHELL := /bin/bash
PY := .venv/bin/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export WANDB_MODE ?= offline
export PYTHONHASHSEED := 0

.PHONY: venv test test-slow test-full test-slurm reproduce reproduce-toy2d reproduce-toy2d-datasets \
	reproduce-toy2d-studies reproduce-table4 reproduce-table4-quick reproduce-text2d-studies reproduce-text3d reproduce-text3d-quick toy2d-weights shapes-prior shapes3d-prior bench sweep-bandwidth sweep-guidance dashboards clean
PRIOR ?= sd21

venv: .venv/.installed

.venv/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install --quiet torch==2.13.0
	# A download that fails its index hash (a truncated or corrupted transfer; CI saw one) is retried without pip's cache.
	for attempt in 1 2 3; do $(PY) -m pip install --quiet $$( [ $$attempt -gt 1 ] && echo --no-cache-dir ) \
	    -e ".[slurm,dev]" && break; [ $$attempt -lt 3 ] || exit 1; echo "pip install failed; retry $$attempt/2"; \
	    sleep 10; done
	touch $@

# Tests (tests/, CPU, offline). `slow` (pyproject.toml) marks the heavy end-to-end tests: a CLI, worker or
# reproduce-script process, a Hydra multirun, the dashboards' real offline runs. make test runs the rest (every
# library test, in-process runs of each task and guidance, the resume-is-bitwise checks); make test-slow only the
# slow ones; make test-full all of them in one pytest. .ci/run: make test, then make test-slow (each test once).
# Measured on the 2-core CPU machine while two other jobs loaded it (load average ~4), wall / user+sys CPU:
# make test 2 min 41 s / 154 s (624 tests); make test-slow 3 min 31 s / 199 s (17 tests). The CPU seconds are about
# the wall time on a quiet machine (the tests run on one thread). Before the split: all 643 in 6 min 37 s / 358 s.
PYTEST := WANDB_MODE=disabled $(PY) -m pytest -q
test: venv
	$(PYTEST) -m "not slow" tests

test-slow: venv
	$(PYTEST) -m slow tests

test-full: venv
	$(PYTEST) tests

# A real one-node SLURM on localhost runs a 4-run toy sweep as a job array (root; installs slurm-wlm if missing)
test-slurm: venv
	WANDB_MODE=disabled slurm/test_sweep.sh

reproduce: reproduce-toy2d reproduce-toy2d-studies reproduce-table4-quick reproduce-text3d-quick

# The fractal toy table (results/toy2d/metrics.*, figure_grid.png): ~6 minutes on 2 cores
reproduce-toy2d: venv
	$(PY) -m eval.reproduce_toy2d

# The same grid on the spiral and the pinwheel (no CFG rows: no classes): results/toy2d/<dataset>/;
# ~8 minutes on 2 cores, hence not part of make reproduce
reproduce-toy2d-datasets: venv
	$(PY) -m eval.reproduce_toy2d --dataset spiral
	$(PY) -m eval.reproduce_toy2d --dataset pinwheel

# The toy studies: product-sampler fidelity (picks MSD's default), gradient quality, loss landscapes
reproduce-toy2d-studies: venv
	$(PY) -m eval.product_fidelity
	$(PY) -m eval.gradient_quality
	$(PY) -m eval.landscapes
	$(PY) -m eval.toy2d_figures

# Table 4 (text-to-2D FID vs iterations): PRIOR=sd21 (GPU node with the weights) or PRIOR=shapes (this CPU);
# seeds 0..2 per method into outputs/table4/<prior>/<method>/seed<k>/; SEEDS="sdi=2 msd=2 msd_common=2" overrides rows
reproduce-table4: venv
	$(PY) -m eval.reproduce_table4 --prior $(PRIOR) $(if $(INCEPTION),task.eval.inception_path=$(INCEPTION)) $(TABLE4_ARGS) $(if $(SEEDS),--seeds $(SEEDS))

# What MSD and the inversion-based methods do on ShapesWorld images: the bandwidth rule, drift vs sample noise,
# DDIM-inversion round trips and SDI target ranges with / without the prior's data range (~10 min, 1 thread), then
# what MSD needs beyond a true sampler (eval.msd_remedies: one change at a time on 12 images, ~30 min on 2 cores)
reproduce-text2d-studies: venv
	$(PY) -m eval.msd_images
	$(PY) -m eval.msd_remedies

reproduce-table4-quick: venv
	$(PY) -m eval.reproduce_table4 --prior shapes --quick

# Text-to-3D on ShapesWorld-3D: 5 methods x 4 prompts (one Janus probe) x 2 seeds -> results/text3d/ (resumable;
# SEEDS=K for more seeds). The MSD bandwidth rule first (results/text3d/msd_scales.csv, ~20 s).
reproduce-text3d: venv
	$(PY) -m eval.text3d_scales
	$(PY) -m eval.reproduce_text3d $(if $(SEEDS),--seeds $(SEEDS))

# The quick 3-D preset of make reproduce: SDS and MSD on one prompt, 60 iterations (outputs/text3d_quick/)
reproduce-text3d-quick: venv
	$(PY) -m eval.reproduce_text3d --quick

shapes-prior: venv
	$(PY) -m experiments.train_shapes --iterations 1800

# The ShapesWorld-3D prior and classifier (shapes/prior3d/, shapes/classifier3d/, results/shapes3d/), one thread.
# Planned from two 20-iteration runs on the loaded 2-core machine (0.78-1.02 s per prior iteration, 0.06-0.07 s per
# classifier iteration, 15-22 ms per render): 8192 renders ~3 min + 1300 prior iterations ~17-22 min + 3000 classifier
# iterations ~3.5 min = 22-29 min of training, ~3.5 min more for the check (held-out renders, turntables, DDIM samples)
shapes3d-prior: venv
	$(PY) -m experiments.train_shapes3d --iterations 1300 --pool 8192 --classifier-iterations 3000

bench: venv
	$(PY) -m eval.bench_gmm
	$(PY) -m eval.bench_text2d

# Every committed toy2d denoiser (fractal A, AB, A_weak; spiral, pinwheel and their _weak guides), one CPU thread;
# a subset: make toy2d-weights TOY2D_MODELS="spiral pinwheel"
toy2d-weights: venv
	$(PY) -m experiments.train_toy2d $(TOY2D_MODELS)

# Sweeps (conf/sweep/<TASK>_bandwidth|guidance.yaml, slurm/README.md): runs into outputs/sweeps/$(NAME)/, then
# the table results/sweeps/$(NAME).csv (+ heat maps):
#   make sweep-bandwidth [TASK=toy2d|text2d|text3d] [NAME=...] [ARGS="hydra/launcher=slurm hydra.launcher.partition=gpu"]
# DRY_RUN=1 prints the sbatch script and each run's directory instead of running anything.
TASK ?= toy2d
SWEEP_TASKS := toy2d text2d text3d
sweep_preset = $(TASK)_$(@:sweep-%=%)
sweep_name = $(or $(NAME),$(sweep_preset))
sweep-bandwidth sweep-guidance: venv
	$(if $(filter $(TASK),$(SWEEP_TASKS)),,$(error TASK must be one of: $(SWEEP_TASKS); got '$(TASK)'))
	$(PY) -m $(if $(DRY_RUN),eval.slurm_dry_run,experiments.run) sweep=$(sweep_preset) \
		hydra.sweep.dir=outputs/sweeps/$(sweep_name) $(ARGS)
	$(if $(DRY_RUN),,$(PY) -m eval.sweeps outputs/sweeps/$(sweep_name) --name $(sweep_name))

# W&B reports of the paper figures: published when WANDB_MODE=online with an API key, else results/dashboards/spec.json
dashboards: venv
	$(PY) -m eval.dashboards $(if $(ENTITY),--entity $(ENTITY))

clean:
	rm -rf outputs multirun .pytest_cache
