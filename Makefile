# The user's verbs. Every target bootstraps its own virtual environment on first use, so on a fresh
# machine `make lds-mnist` and `make test` are the only commands anyone has to type.

PYTHON_SYS ?= python3
VENV       ?= .venv
PY         := $(VENV)/bin/python
# Reinstall when the dependency list changes.
STAMP      := $(VENV)/.installed-$(shell sha256sum pyproject.toml | cut -c1-12)
TDABENCH   := $(PY) -m benchmark

.PHONY: venv data test test-fast lds-mnist lds-fmnist gt-mnist gt-fmnist gt-small gt-verify bench-train clean-venv help

help:
	@echo "make lds-mnist    reproduce Table 1's MNIST row from the committed ground truth"
	@echo "make test         run the test suite (what CI runs)"
	@echo "make data         fetch and verify MNIST and FashionMNIST"
	@echo "make gt-mnist     build/resume the mnist-cnn ground truth (hours on CPU; resumable)"
	@echo "make gt-verify    verify every committed ground-truth artifact"
	@echo "make bench-train  training throughput: plain loop vs vmap-batched, models per minute"

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON_SYS) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[test]'
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
	$(TDABENCH) gt mnist-cnn --verify
	@echo "LDS evaluation is not implemented yet (issue 4); the ground truth above is what it will use."

lds-fmnist: venv
	$(TDABENCH) gt fmnist-cnn --verify
	@echo "LDS evaluation is not implemented yet (issue 4); the ground truth above is what it will use."

gt-mnist: venv
	$(TDABENCH) gt mnist-cnn

gt-fmnist: venv
	$(TDABENCH) gt fmnist-cnn

gt-small: venv
	$(TDABENCH) gt mnist-lr
	$(TDABENCH) gt mnist-mlp-small

gt-verify: venv
	@for s in $$(ls results/gt); do $(TDABENCH) gt $$s --verify > /dev/null && echo "$$s: ok" || exit 1; done

bench-train: venv
	$(PY) -m benchmark.bench_train

clean-venv:
	rm -rf $(VENV)
