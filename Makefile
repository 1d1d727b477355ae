# `make train` and `make test` set up .venv on first use, then run.
PYTHON ?= python3
VENV ?= .venv
# A CPU build of torch for tests and CI; GPU users: make TORCH_SPEC="torch>=2.3" ...
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install train test test-slow docs bench bench-speed bench-scale gpu-check pretrain-demo donor-shift-study baseline-study trust-study donor-adaptation-study notebook clean

install: $(STAMP)

# PYTHONWARNINGS=ignore: the build backend's notices (an editable install) stay off the console.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	PYTHONWARNINGS=ignore $(BIN)/python -m pip install --quiet --upgrade pip
	PYTHONWARNINGS=ignore $(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	PYTHONWARNINGS=ignore $(BIN)/python -m pip install --quiet -e ".[dev]"
	# sweep=optuna is this project's own sweeper now; the released one (optuna<3) would shadow it
	PYTHONWARNINGS=ignore $(BIN)/python -m pip uninstall --quiet --yes hydra-optuna-sweeper
	touch $(STAMP)

# ARGS: overrides added to the command line, e.g. make train ARGS="trainer.max_epochs=2"
train: $(STAMP)
	$(BIN)/python train.py experiment=colon6 $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

# The docs site (docs/ and the API reference from the docstrings) into site/; --strict: a broken link,
# a missing page or an unresolved reference fails the build (not --quiet: it would hide them and pass).
# NO_MKDOCS_2_WARNING: mkdocs-material's notice about its successor.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

bench: $(STAMP)
	$(BIN)/python bench/tokenize.py
	$(BIN)/python bench/tokenize.py --cells 1000000 --genes 10000

bench-speed: $(STAMP)
	$(BIN)/python bench/train_speed.py

# Geneformer V1-10M and V2-104M at their real shapes on the CPU, random weights (docs/benchmarks.md)
bench-scale: $(STAMP)
	$(BIN)/python bench/model_scale.py --v2-layers 2 --markdown bench/model_scale.md

# V2-104M's shape on one GPU, random weights: training (token budgets, with and without activation
# checkpointing), predict, perturb and explain; at most about 8 minutes on one H100; installs nothing: runs on
# the python first on PATH (an environment with a CUDA build of torch and this project's requirements)
gpu-check:
	python bench/gpu_check.py

# Pretrain a tiny model on the embedded data, then fine-tune colon6 from it and from random
# weights with the same seed, and compare the two.
pretrain-demo: $(STAMP)
	$(BIN)/python pretrain.py overwrite=true
	$(BIN)/python train.py experiment=colon6 model=pretrained model.encoder.pretrained=outputs/pretrain/hf \
		run_name=colon6-pretrained overwrite=true
	$(BIN)/python train.py experiment=colon6 run_name=colon6-random overwrite=true
	$(BIN)/python -m geneformer_colon compare outputs/colon6-pretrained outputs/colon6-random

# colon6 under cv=lodo x 3 seeds, alone and with each donor-robust strategy (and LoRA on a pretrained
# checkpoint), at donor_shift 1 and at a shift of batch effect and depth only; <out>/study.md.
donor-shift-study: $(STAMP)
	$(BIN)/python bench/donor_shift_study.py

# colon6 and every baseline (naive Bayes, logistic regression, PCA + kNN, scANVI both ways, frozen-encoder probes)
# under cv=lodo x 3 seeds at the donor-shift study's settings, in its folder (its colon6 runs reused);
# <out>/baseline-study.md.
baseline-study: $(STAMP)
	$(BIN)/python bench/baseline_study.py

# colon6 under cv=lodo x 3 seeds with calibration=temperature: which calls to trust on a new donor (error in the
# least sure cells, coverage, abstention, conformal sets with and without temperature); <out>/trust-study.md.
trust-study: $(STAMP)
	$(BIN)/python bench/trust_study.py

# colon6 and each adapt method (mlm, self_training, dann, tent: the test donor's unlabelled cells) and scANVI
# holding them unlabelled, under cv=lodo x 3 seeds at the donor-shift study's settings, KUL01's macro F1 beside
# KUL19's; resumable; outputs/donor-adaptation-study/adaptation-study.md.
donor-adaptation-study: $(STAMP)
	$(BIN)/python bench/donor_adaptation_study.py

# notebooks/compare_runs.ipynb run top to bottom into outputs/compare_runs.html (which runs: the notebook's
# RUN_DIRS or $GENEFORMER_COLON_RUNS). The kernel is this environment's python (first on PATH). (Jupyter's IPC
# transport is not used: run from the repository root its kernel could hang at start.)
notebook: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/jupyter nbconvert --to html --execute notebooks/compare_runs.ipynb \
		--output-dir outputs --output compare_runs

clean:
	rm -rf outputs multirun/*/ .pytest_cache site
