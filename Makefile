# The user's verbs. Every target bootstraps its own virtual environment on first use, so on a fresh
# machine `make lds-mnist` and `make test` are the only commands anyone has to type.

PYTHON_SYS ?= python3
VENV       ?= .venv
PY         := $(VENV)/bin/python
# The stamp's name carries the dependency list's content hash, and it has no prerequisites: the venv is
# reinstalled when pyproject.toml's *content* changes, not when a checkout merely touches the file.
STAMP      := $(VENV)/.installed-$(shell sha256sum pyproject.toml | cut -c1-12)
TDABENCH   := $(PY) -m benchmark

.PHONY: venv data test test-fast lds-mnist lds-fmnist table1 gt-mnist gt-fmnist gt-small gt-verify gt-reproduce zoo clean-venv help
.PHONY: leaderboard report mislabel-mnist figures-mnist gap-mnist gap-fmnist regress ihvp-error gt-studies-mnist
.PHONY: bench bench-compare bench-train bench-solvers bench-peers mutate counterfactual-mnist unlearning-mnist

# Solvers the evaluation targets run (Table 1's method by default): make lds-mnist SOLVERS="ekfac identity"
SOLVERS    ?= ekfac
SOLVER_ARGS = $(foreach s,$(SOLVERS),--solver $(s))
# Rows `make leaderboard` reruns when missing or stale: SETTINGS=… and SOLVERS=… given on the command line narrow
# them (default: every row); the tables always keep every row.
SETTINGS   ?=
LB_ARGS     = $(foreach s,$(SETTINGS),--setting $(s)) \
              $(if $(filter command line environment,$(origin SOLVERS)),$(SOLVER_ARGS))

help: ## this list, read from the Makefile's own target comments
	@awk -f scripts/make_help.awk $(MAKEFILE_LIST)

$(STAMP):
	@test -x $(PY) || $(PYTHON_SYS) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[test,vision,distributed]'
	@rm -f $(VENV)/.installed-*
	@touch $@

venv: $(STAMP) ## .venv with the project and its test, vision and distributed extras (2.3 min measured; longer where torch downloads)

data: venv ## fetch and verify MNIST and FashionMNIST (seconds; FashionMNIST needs Debian's dataset-fashion-mnist)
	$(TDABENCH) data mnist-cnn fmnist-cnn

test: venv ## run the test suite (what CI runs; about 20 min on 2 cores)
	$(PY) -m pytest -q

test-fast: venv ## the test suite without the tests marked slow
	$(PY) -m pytest -q -m "not slow"

lds-mnist: venv ## Table 1, MNIST row: RECOMPUTED from the committed ground truth, beside the record and the paper
	$(TDABENCH) data mnist-cnn
	$(TDABENCH) lds mnist-cnn $(SOLVER_ARGS)

lds-fmnist: venv ## Table 1, FashionMNIST row, recomputed the same way
	$(TDABENCH) data fmnist-cnn
	$(TDABENCH) lds fmnist-cnn $(SOLVER_ARGS)

table1: venv ## Table 1 from the committed records only (no recomputation; stale records are marked)
	$(TDABENCH) table1 mnist-cnn $(SOLVER_ARGS)
	$(TDABENCH) table1 fmnist-cnn $(SOLVER_ARGS)

mislabel-mnist: venv ## mislabel detection on mnist-cnn's corrupted-label model (recall@k, AUC)
	$(TDABENCH) data mnist-cnn
	$(TDABENCH) mislabel mnist-cnn $(SOLVER_ARGS)

# Six queries: the seeded choice the report's gallery shows for every solver (results/qualitative/)
figures-mnist: venv ## the images each solver blames for six seeded mnist-cnn queries (results/qualitative/)
	$(TDABENCH) data mnist-cnn
	$(TDABENCH) figures mnist-cnn $(SOLVER_ARGS) --n-queries 6

# The gap study starts from the damping the LDS run chose on validation queries, adds dampings below the
# solvers' grid (its smallest value, 1e-4, won on mnist-cnn), and then reports the protocol chosen on
# validation on the reported queries.
GAP_ARGS   ?= --damping 1e-8 --damping 1e-6 --damping 1e-5 --report
gap-mnist: venv ## Table 1 gap study: LDS vs replicas, ensemble, measurement, damping (validation queries)
	$(TDABENCH) gap mnist-cnn $(SOLVER_ARGS) $(GAP_ARGS)

gap-fmnist: venv ## the same gap study on fmnist-cnn
	$(TDABENCH) gap fmnist-cnn $(SOLVER_ARGS) $(GAP_ARGS)

.PHONY: ceiling
ceiling: venv ## the noise ceiling's bias and the corrected ceiling of every committed ground truth (results/ceiling.json)
	$(TDABENCH) ceiling

leaderboard: venv ## rerun missing/stale rows, write results/leaderboard.{csv,md}, figures and the report
##|   make leaderboard SETTINGS='mnist-lr mnist-mlp-small' SOLVERS=mysolver: only those rows
	$(TDABENCH) leaderboard $(LB_ARGS)

# `make leaderboard` rebuilds it too; this only redraws it from what is committed
report: venv ## the results site results/report/index.html from the committed results (no recomputation)
	$(TDABENCH) report

regress: venv ## CI check: attribution quality against results/baselines.json
	$(TDABENCH) regress

gt-mnist: venv ## build/resume/repair the mnist-cnn ground truth (hours on CPU; resumable)
	$(TDABENCH) gt mnist-cnn

gt-fmnist: venv ## build/resume/repair the fmnist-cnn ground truth (hours on CPU; resumable)
	$(TDABENCH) gt fmnist-cnn

gt-small: venv ## build/resume the mnist-lr and mnist-mlp-small ground truths
	$(TDABENCH) gt mnist-lr
	$(TDABENCH) gt mnist-mlp-small

gt-verify: venv ## verify every committed ground-truth artifact (checksums, pinned root hash, consistency)
	@for s in $$(ls results/gt); do $(TDABENCH) gt $$s --verify > /dev/null && echo "$$s: ok" || exit 1; done
	@for s in $$(ls results/gt-studies 2>/dev/null); do \
	  $(TDABENCH) gt "$$s" --study --verify > /dev/null && echo "$$s (study): ok" || exit 1; done

# Retrain REPRODUCE_UNITS subset models and REPRODUCE_FULL full-data models of each CNN ground truth from their
# recorded seeds, beside seed noise (docs/ground-truth.md); fails only when a unit is not reproduced.
REPRODUCE_UNITS ?= 4
REPRODUCE_FULL  ?= 1
gt-reproduce: venv ## retrain a few committed CNN ground-truth units here and compare them (minutes on 2 cores)
	@rc=0; for s in mnist-cnn fmnist-cnn; do \
	  $(TDABENCH) gt $$s --reproduce $(REPRODUCE_UNITS) --reproduce-full $(REPRODUCE_FULL) || rc=1; done; exit $$rc

# The explained-model zoo (results/models/): 16 models for the small settings, 8 for the CNNs; it only grows.
zoo: venv ## the explained-model zoo: full-data models by seed with per-epoch checkpoints
	$(TDABENCH) zoo mnist-lr --models 16
	$(TDABENCH) zoo mnist-mlp-small --models 16
	$(TDABENCH) zoo mnist-cnn --models 8
	$(TDABENCH) zoo fmnist-cnn --models 8

# Study ground truths for the gap study's seed-policy and training-length rows (results/gt-studies/, never the
# benchmark's ground truth): the first 50 subsets with 2 seeds each, trained with varied seeds, and for
# STUDY_EPOCHS epochs. About 50 + 20 + 100 CPU-minutes on 2 cores; minutes on a GPU. Then `make gap-mnist`.
STUDY_ARGS   ?= --subsets 50 --seeds 2 --full-models 1
STUDY_EPOCHS ?= 3 16
gt-studies-mnist: venv ## study ground truths for the gap study (seed policy, training length; CPU hours)
	$(TDABENCH) gt mnist-cnn --study --seed-policy varied $(STUDY_ARGS)
	@for e in $(STUDY_EPOCHS); do $(TDABENCH) gt "mnist-cnn@epochs=$$e" $(STUDY_ARGS) || exit 1; done

# Counterfactual retraining (docs/counterfactual.md): models retrained without (or with repaired) training points,
# several seeds each, into results/counterfactual/ and results/unlearning/; a rerun resumes where it stopped.
# mnist-lr models train in seconds; mnist-cnn's 122 + 30 models took 59 + 10 min on 2 cores (2 workers), minutes on a GPU.
CF_LR_SOLVERS  ?= exact cg lissa kfac ekfac identity
CF_CNN_SOLVERS ?= kfac ekfac identity
counterfactual-mnist: venv ## remove-top-k vs retraining, mnist-lr and mnist-cnn (CPU hours; resumable)
	$(TDABENCH) counterfactual mnist-lr $(foreach s,$(CF_LR_SOLVERS),--solver $(s)) --queries 20 --seeds 3 \
	  --units-per-job 20
	$(TDABENCH) counterfactual mnist-cnn $(foreach s,$(CF_CNN_SOLVERS),--solver $(s)) --queries 5 --k 10 --k 100 \
	  --k 1000 --seeds 2

UL_LR_SOLVERS  ?= exact kfac ekfac identity
unlearning-mnist: venv ## Newton unlearning / label repair vs retraining, mnist-lr and mnist-cnn (resumable)
	$(TDABENCH) unlearning mnist-lr $(foreach s,$(UL_LR_SOLVERS),--solver $(s)) --rank-by exact --seeds 5 \
	  --units-per-job 5
	$(TDABENCH) unlearning mnist-cnn $(foreach s,$(CF_CNN_SOLVERS),--solver $(s)) --rank-by ekfac --size 0.001 \
	  --size 0.01 --size 0.05 --seeds 2

ihvp-error: venv ## each solver's IHVP error against the exact inverse (results/ihvp_error.csv)
	$(TDABENCH) ihvp-error

# Datamodels (docs/counterfactual.md): 3,000 alpha = 0.5 subset models per setting, one thread, into
# results/datamodels/<setting>/ (resumable; ≈ 0.2 s a model for mnist-lr, 0.5 s for mnist-mlp-small on an idle core),
# then ridge regressions on the first 100, 300, 1,000 and 3,000 -> results/datamodels/<setting>.json.
.PHONY: datamodels-small
datamodels-small: venv ## datamodels (retraining as attribution) on mnist-lr and mnist-mlp-small (resumable)
	$(TDABENCH) datamodels mnist-lr
	$(TDABENCH) datamodels mnist-mlp-small

# Cost benchmarks: benchmarks/ (pytest-benchmark), never part of `make test`. `make bench` saves a run under
# results/perf/<device>/ (commit it to make it the reference); `make bench-compare` runs the suite and fails when a
# benchmark's fastest round is more than BENCH_FAIL slower than in the last committed run of this machine
# (min:50% = 1.5x; a quiet machine is assumed: every saved run records the load average). BENCH_SLOWDOWN=2 plants
# a 2x slowdown (every call sleeps as long as it ran) to show the comparison fails; BENCH_SELECT narrows the
# suite, e.g. BENCH_SELECT="-k fit".
BENCH_DEVICE   = $(shell $(PY) -m benchmarks device 2>/dev/null)
BENCH_FAIL    ?= min:50%
BENCH_SELECT  ?=
BENCH_SLOWDOWN ?= 1
BENCH_ARGS     = -p no:cacheprovider --benchmark-enable --benchmark-only --benchmark-sort=name \
                 --benchmark-storage=file://results/perf/$(BENCH_DEVICE) $(BENCH_SELECT)
bench: venv ## cost benchmarks: every stage's time, peak memory and flop floor, saved under results/perf/<device>/
	$(PY) -m pytest benchmarks $(BENCH_ARGS) --benchmark-save=$(shell git rev-parse --short HEAD)

bench-compare: venv ## the cost benchmarks compared with the committed run: fails on a slowdown beyond BENCH_FAIL
	TDABENCH_BENCH_SLOWDOWN=$(BENCH_SLOWDOWN) $(PY) -m pytest benchmarks $(BENCH_ARGS) \
	  --benchmark-compare=$$($(PY) -m benchmarks baseline) --benchmark-compare-fail=$(BENCH_FAIL)

bench-train: venv ## the training part of the cost benchmarks (not saved)
	$(PY) -m pytest benchmarks/test_train.py $(BENCH_ARGS)

bench-solvers: venv ## the solver part of the cost benchmarks (not saved)
	$(PY) -m pytest benchmarks/test_solvers.py $(BENCH_ARGS)

# Our EK-FAC against Kronfluence's on mnist-cnn's explained model, each in its own process (about 15 min on 2
# idle cores): results/perf/peers-<device>.json. Installs the peers extra into the venv first.
bench-peers: venv ## our EK-FAC vs Kronfluence's on mnist-cnn (installs the peers extra): results/perf/peers-*.json
	@$(PY) -c "import kronfluence, trak, dattri" 2>/dev/null || $(PY) -m pip install -q -e '.[peers]'
	$(PY) -m benchmarks.bench_peers

# Mutation testing (docs/testing.md): mutmut changes the code that computes numbers one mutant at a time and runs
# the fast tests that execute it (in a copy under mutants/, reading the committed results/); survivors and the kill
# rate per module go to results/mutation/. Not part of `make test` or CI. MUTATE names the mutants by module and
# function (mutmut's mutant-name patterns): make mutate MUTATE="benchmark.core.stats.*"
# Every mutant of the fast modules (metrics, statistics, protocol, seeding: ~0.4 s each); a fixed sample of the
# slower ones (curvature, solver API, training, our solvers: their tests fit models), the first mutant of every
# function and every one whose number ends in 0 or 5 (~22%), so that the default run fits 30 min on 2 cores.
# Left out: the run engine (orchestration; its tests run whole benchmark tasks, test_runner) and the peer
# adapters (kronfluence, traker, dattri: their numbers are the peer library's, their tests need the peers extra).
MUTATE_ALL     ?= benchmark.core.stats benchmark.evaluate.metrics benchmark.groundtruth.protocol
MUTATE_SAMPLED ?= benchmark.core.kronecker benchmark.core.products benchmark.evaluate.solver benchmark.setup.training \
                  $(patsubst solvers/%.py,solvers.%,$(filter-out solvers/kronfluence.py solvers/traker.py solvers/dattri.py,$(wildcard solvers/*.py)))
MUTATE ?= $(foreach m,$(MUTATE_ALL),$(m).*) \
          benchmark.setup.config.x_unit_seed__mutmut_* benchmark.setup.config.x_stable_hash__mutmut_* \
          $(foreach m,$(MUTATE_SAMPLED),$(m).*__mutmut_1 $(m).*__mutmut_*[05])
MUTATION_STAMP := $(VENV)/.mutation-$(shell sha256sum pyproject.toml | cut -c1-12)

$(MUTATION_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[test,vision,distributed,mutation]'
	@rm -f $(VENV)/.mutation-*
	@touch $@

mutate: venv $(MUTATION_STAMP) ## mutation testing of the modules that compute numbers (~30 min; not CI; docs/testing.md)
	rm -rf mutants
	@start=$$(date +%s); TDABENCH_RESULTS=$(CURDIR)/results $(PY) -m mutmut run --max-children 2 $(foreach m,$(MUTATE),"$(m)") || exit 1; \
	  $(PY) scripts/mutation_report.py --seconds $$(( $$(date +%s) - start )) --covered $(foreach m,$(MUTATE),"$(m)")

# The cost-quality frontier (issue 35): LDS against total compute for ensembles of 1..32 zoo models, one model's
# checkpoints, and both; every member is fitted and scored once into results/frontier/.units/ (ignored; a rerun
# resumes there) and every point is an average of them. Needs the 32-model zoo: tdabench zoo mnist-cnn --models 32
FRONTIER_FAMILIES ?= ekfac trak ekfac:ckpt ekfac:ckpt+zoo
.PHONY: frontier-mnist
frontier-mnist: venv ## the cost-quality frontier on mnist-cnn (CPU hours; resumable): results/frontier/, figures
	$(TDABENCH) data mnist-cnn
	$(TDABENCH) frontier mnist-cnn $(foreach f,$(FRONTIER_FAMILIES),--family $(f))

# On a GPU machine: ground truth + EK-FAC for the timm settings, within BUDGET_S seconds, resumable
# (docs/large-settings.md). e.g. make gpu-runbook BUDGET_S=3600 RUNBOOK_SETTINGS="fmnist-resnet mnist-vit"
.PHONY: gpu-runbook
BUDGET_S ?= 14400
gpu-runbook: venv ## GPU: ground truth + EK-FAC for the timm settings (docs/large-settings.md)
	PY=$(PY) BUDGET_S=$(BUDGET_S) scripts/gpu_runbook.sh $(RUNBOOK_SETTINGS)

clean-venv: ## delete .venv
	rm -rf $(VENV)
