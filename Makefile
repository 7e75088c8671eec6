# Quick start:  make demo   (install + ISImed pretraining on the synthetic chest phantom)
#               make test   (install + tests)
# Another interpreter in its own venv: make test PYTHON=python3.11 VENV=.venv-py311
# Default: the newest working python3.13 / 3.12 / 3.11 on the PATH (3.12 and newer get the newest
# jax; 3.11 the newest releases that still support it: setup.cfg).
PYTHON ?= $(firstword $(foreach p,python3.13 python3.12 python3.11,$(shell $(p) -c 'print("$(p)")' 2>/dev/null)))
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= workdirs/isimed_chest_demo

.PHONY: install test lint demo benchmark benchmark-reference compare clean

$(VENV)/.installed: setup.cfg pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || { echo "$(PYTHON) is not a working Python 3.11 or newer (set PYTHON=python3.X)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q -n 2 --dist loadgroup tests

# ruff (pinned in the [test] extra) with ruff.toml: lint, and the formatting check.
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

demo: install
	$(PY) main.py --config=configs/isimed_chest.py:demo --workdir=$(WORKDIR)
	$(PY) linear_eval.py --config=configs/linear_eval_chest.py:demo \
		--config.pretrain_workdir=$(WORKDIR) --workdir=$(WORKDIR)/linear_eval

benchmark: install
	$(PY) -m benchmarks.train_loop
	$(PY) -m benchmarks.pipeline
	$(PY) -m benchmarks.augment
	# 16 DenseNet-121 crops per step keeps this to ~15 min on 2 CPU cores; on a GPU run
	# `python -m benchmarks.train_step` for the 128-crop rows.
	$(PY) -m benchmarks.train_step --densenet_crops=16

# The authors' PyTorch + MONAI DenseNet-121 step against this project's, same shapes, same CPU
# (own venv: torch and monai are not project dependencies). CROPS=128 crops of 32^3 per step.
# Then the input pipeline on a real 1 mm brain MRI against the authors' MONAI transforms.
REF_VENV := .venv-reference
REF_PY := $(REF_VENV)/bin/python
CROPS ?= 128

$(REF_VENV)/.installed: setup.cfg pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || { echo "$(PYTHON) is not a working Python 3.11 or newer (set PYTHON=python3.X)"; exit 1; }
	$(PYTHON) -m venv $(REF_VENV)
	$(REF_PY) -m pip install -q --upgrade pip
	$(REF_PY) -m pip install -q -e '.[reference]'  # torch 2.15.0 and monai 1.6.1 (setup.cfg)
	touch $@

benchmark-reference: $(REF_VENV)/.installed
	$(REF_PY) -m benchmarks.reference --crops=$(CROPS)
	$(REF_PY) -m benchmarks.pipeline --rows=real

# ISImed (with and without a head), the hybrid, SimCLR, VICReg, Barlow Twins on the phantom (demo
# preset; SEEDS=3 for seed spread); HYBRID_WEIGHTS: extra hybrid runs for the trade-off table.
SEEDS ?= 1
HYBRID_WEIGHTS ?= 0.1,3
compare: install
	$(PY) -m experiments.compare_methods --seeds=$(SEEDS) --hybrid_weights=$(HYBRID_WEIGHTS)

# Position transfer on real MRI: the folder demo preset pretrained on nilearn's MNI152 template,
# crop position probed on smoothly deformed, bias-shaded, noisy copies of it (docs/results.md: Position transfer).
.PHONY: position-transfer
position-transfer: install
	$(PY) -m experiments.position_transfer

# One-shot localisation on real MRI: MNI152 brain points found in moved, deformed, cut copies of
# it with the position-transfer encoder, against the identity and SimpleITK registration.
.PHONY: localisation
localisation: install
	@$(PY) -c 'import SimpleITK' 2>/dev/null || $(PY) -m pip install -q -e '.[registration]'
	$(PY) -m experiments.localisation

# TensorBoard on every run under workdirs/ (LOGDIR=...); installs the [tracking] extra on first use.
LOGDIR ?= workdirs
.PHONY: tensorboard
tensorboard: install
	@test -x $(VENV)/bin/tensorboard || $(PY) -m pip install -q -e '.[tracking]'
	$(VENV)/bin/tensorboard --logdir $(LOGDIR)

clean:
	rm -rf $(VENV) *.egg-info

# Label efficiency: random init and every pretraining arm fine-tuned with 2 subjects / 10% / 25% /
# 100% of the phantom's training labels (demo preset; SEEDS=3 for the spread and paired differences).
.PHONY: finetune
finetune: install
	$(PY) -m experiments.label_efficiency --seeds=$(SEEDS)
