# The user's verbs. Every target bootstraps its own virtual environment on first use, so on a fresh
# machine `make lds-mnist` and `make test` are the only commands anyone has to type.

PYTHON_SYS ?= python3
VENV       ?= .venv
PY         := $(VENV)/bin/python
# Reinstall when the dependency list changes.
STAMP      := $(VENV)/.installed-$(shell sha256sum pyproject.toml | cut -c1-12)
TDABENCH   := $(PY) -m benchmark

.PHONY: venv data test test-fast lds-mnist lds-fmnist gt-mnist gt-fmnist gt-small gt-verify bench-train clean-venv help
.PHONY: leaderboard mislabel-mnist figures-mnist gap-mnist gap-fmnist regress ihvp-error bench-solvers gt-studies-mnist

# Solvers the evaluation targets run (Table 1's method by default): make lds-mnist SOLVERS="ekfac identity"
SOLVERS    ?= ekfac
SOLVER_ARGS = $(foreach s,$(SOLVERS),--solver $(s))

help:
	@echo "make lds-mnist    reproduce Table 1's MNIST row from the committed ground truth"
	@echo "make test         run the test suite (what CI runs)"
	@echo "make data         fetch and verify MNIST and FashionMNIST"
	@echo "make gt-mnist     build/resume the mnist-cnn ground truth (hours on CPU; resumable)"
	@echo "make gt-verify    verify every committed ground-truth artifact"
	@echo "make bench-train  training throughput: plain loop vs vmap-batched, models per minute"
	@echo "make ihvp-error   IHVP error of every solver vs the exact damped inverse (mnist-lr, mnist-mlp-small)"
	@echo "make bench-solvers solver cost on mnist-cnn: fit, 2000x60000 scores (extrapolated), peak memory"
	@echo "make gpu-runbook  GPU: ground truth + EK-FAC for the timm settings (docs/large-settings.md)"
	@echo "make leaderboard  rerun stale/missing runs, write results/leaderboard.{csv,md} and figures"
	@echo "make mislabel-mnist  mislabel detection on mnist-cnn (10% flipped) vs random and training loss"
	@echo "make figures-mnist   qualitative figures: influential and top self-influence training images"
	@echo "make gap-mnist    Table 1 gap study: LDS vs replicas, ensemble, measurement, damping (validation queries)"
	@echo "make gt-studies-mnist  study ground truths (varied seeds, other epochs) for the gap study's further rows"
	@echo "make regress      CI check: attribution quality against results/baselines.json"

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON_SYS) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[test,vision,distributed]'
	@rm -f $(VENV)/.installed-*
	@touch $@

venv: $(STAMP)

data: venv
	$(TDABENCH) data mnist-cnn fmnist-cnn

test: venv
	$(PY) -m pytest -q

test-fast: venv
	$(PY) -m pytest -q -m "not slow"

lds-mnist: venv
	$(TDABENCH) data mnist-cnn
	$(TDABENCH) gt mnist-cnn --verify > /dev/null && echo "mnist-cnn ground truth: checksums verified"
	$(TDABENCH) lds mnist-cnn $(SOLVER_ARGS)

lds-fmnist: venv
	$(TDABENCH) data fmnist-cnn
	$(TDABENCH) gt fmnist-cnn --verify > /dev/null && echo "fmnist-cnn ground truth: checksums verified"
	$(TDABENCH) lds fmnist-cnn $(SOLVER_ARGS)

mislabel-mnist: venv
	$(TDABENCH) data mnist-cnn
	$(TDABENCH) mislabel mnist-cnn $(SOLVER_ARGS)

figures-mnist: venv
	$(TDABENCH) data mnist-cnn
	$(TDABENCH) figures mnist-cnn $(SOLVER_ARGS)

# The gap study starts from the damping the LDS run chose on validation queries (run lds-mnist first), adds
# dampings below the solvers' grid (its smallest value, 1e-4, won on mnist-cnn), and then reports the
# protocol chosen on validation on the reported queries.
GAP_ARGS   ?= --damping 1e-8 --damping 1e-6 --damping 1e-5 --report
gap-mnist: venv
	$(TDABENCH) gap mnist-cnn $(SOLVER_ARGS) $(GAP_ARGS)

gap-fmnist: venv
	$(TDABENCH) gap fmnist-cnn $(SOLVER_ARGS) $(GAP_ARGS)

leaderboard: venv
	$(TDABENCH) leaderboard

regress: venv
	$(TDABENCH) regress

gt-mnist: venv
	$(TDABENCH) gt mnist-cnn

gt-fmnist: venv
	$(TDABENCH) gt fmnist-cnn

gt-small: venv
	$(TDABENCH) gt mnist-lr
	$(TDABENCH) gt mnist-mlp-small

gt-verify: venv
	@for s in $$(ls results/gt); do $(TDABENCH) gt $$s --verify > /dev/null && echo "$$s: ok" || exit 1; done
	@for s in $$(ls results/gt-studies 2>/dev/null); do \
	  $(TDABENCH) gt "$$s" --study --verify > /dev/null && echo "$$s (study): ok" || exit 1; done

# Study ground truths for the gap study's seed-policy and training-length rows (results/gt-studies/, never the
# benchmark's ground truth): the first 50 subsets with 2 seeds each, trained with varied seeds, and for
# STUDY_EPOCHS epochs. About 50 + 20 + 100 CPU-minutes on 2 cores; minutes on a GPU. Then `make gap-mnist`.
STUDY_ARGS   ?= --subsets 50 --seeds 2 --full-models 1
STUDY_EPOCHS ?= 3 16
gt-studies-mnist: venv
	$(TDABENCH) gt mnist-cnn --study --seed-policy varied $(STUDY_ARGS)
	@for e in $(STUDY_EPOCHS); do $(TDABENCH) gt "mnist-cnn@epochs=$$e" $(STUDY_ARGS) || exit 1; done

bench-train: venv
	$(PY) -m benchmarks.bench_train

ihvp-error: venv
	$(TDABENCH) ihvp-error

bench-solvers: venv
	$(PY) -m benchmarks.bench_solvers

# On a GPU machine: ground truth + EK-FAC for the timm settings, within BUDGET_S seconds, resumable
# (docs/large-settings.md). e.g. make gpu-runbook BUDGET_S=3600 RUNBOOK_SETTINGS="fmnist-resnet mnist-vit"
.PHONY: gpu-runbook
BUDGET_S ?= 14400
gpu-runbook: venv
	PY=$(PY) BUDGET_S=$(BUDGET_S) scripts/gpu_runbook.sh $(RUNBOOK_SETTINGS)

clean-venv:
	rm -rf $(VENV)
