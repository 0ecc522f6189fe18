# Two commands do all set-up: `make test` and `make demo` (each creates .venv/ if missing).
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
SUM := $(shell cat pyproject.toml | cksum | cut -d' ' -f1)
# A venv whose python is gone, lacks pip or is older than 3.11 (flax and
# grain need 3.11) is made again: its stamp name then ends in -broken,
# which never exists.
HEALTHY = $(shell $(1)/bin/python -c 'import sys, pip; print(int(sys.version_info >= (3, 11)))' 2>/dev/null)
STAMP := $(VENV)/.installed-$(SUM)$(if $(filter 1,$(call HEALTHY,$(VENV))),,-broken)

# $(call make_venv,DIR): (re)creates DIR with $(PY), else python3 if it is
# 3.11 or newer; one error line if neither is.
define make_venv
	@test "$(call HEALTHY,$(1))" = 1 || { for py in $(PY) python3; do \
	  if command -v $$py >/dev/null 2>&1 && \
	     $$py -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then \
	    rm -rf $(1) && $$py -m venv $(1); exit $$?; fi; \
	done; echo "error: no Python 3.11 or newer (tried $(PY), python3); run make PY=/path/to/python3.11" >&2; exit 1; }
endef

.PHONY: test test-seqio test-oldest demo venv benchmark clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(call make_venv,$(VENV))
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev]"
	@rm -f $(VENV)/.installed-*
	@touch $(VENV)/.installed-$(SUM)

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadgroup -q --durations=20 tests

# seqio needs full TensorFlow (~3 GB), so its tests get a venv of their own;
# CI runs them (.ci/run), where a missing seqio fails instead of skipping.
SEQIO_VENV := .venv-seqio
SEQIO_STAMP := $(SEQIO_VENV)/.installed-$(SUM)$(if $(filter 1,$(call HEALTHY,$(SEQIO_VENV))),,-broken)
$(SEQIO_STAMP): pyproject.toml
	$(call make_venv,$(SEQIO_VENV))
	$(SEQIO_VENV)/bin/python -m pip install -q --upgrade pip
	$(SEQIO_VENV)/bin/python -m pip install -q -e ".[train,seqio]" pytest
	@rm -f $(SEQIO_VENV)/.installed*
	@touch $(SEQIO_VENV)/.installed-$(SUM)

test-seqio: $(SEQIO_STAMP)
	LRO_REQUIRE_SEQIO=1 $(SEQIO_VENV)/bin/python -m pytest -q tests/test_data_seqio.py

# The library's tests on the oldest versions pyproject.toml admits for it
# (jax, optax, chex, numpy): its own dependencies alone, no flax or orbax
# (their tests skip). CI runs them (.ci/run).
OLDEST_VENV := .venv-oldest
OLDEST_PINS := jax==0.6.0 jaxlib==0.6.0 optax==0.2.8 chex==0.1.87 numpy==1.26.4
OLDEST_STAMP := $(OLDEST_VENV)/.installed-$(SUM)$(if $(filter 1,$(call HEALTHY,$(OLDEST_VENV))),,-broken)
LIBRARY_TESTS := tests/test_baselines.py tests/test_cpu_deadlock.py \
  tests/test_doctests.py tests/test_donation.py tests/test_factory.py \
  tests/test_init.py tests/test_input_checks.py tests/test_linalg.py \
  tests/test_lora_rite.py tests/test_readme_api.py tests/test_sharding.py
$(OLDEST_STAMP): pyproject.toml Makefile
	$(call make_venv,$(OLDEST_VENV))
	$(OLDEST_VENV)/bin/python -m pip install -q --upgrade pip
	$(OLDEST_VENV)/bin/python -m pip install -q $(OLDEST_PINS) "pytest>=8" "pytest-xdist>=3.5" "scipy>=1.11"
	$(OLDEST_VENV)/bin/python -m pip install -q --no-deps -e .
	@rm -f $(OLDEST_VENV)/.installed*
	@touch $(OLDEST_VENV)/.installed-$(SUM)

test-oldest: $(OLDEST_STAMP)
	$(OLDEST_VENV)/bin/python -m pytest -n 2 -q -p no:cacheprovider $(LIBRARY_TESTS)

demo: $(STAMP)
	$(BIN)/python -m train --config demo --run_dir runs/demo-$$(date +%Y%m%d-%H%M%S)

benchmark: $(STAMP)
	$(BIN)/python benchmarks/optimizer_step.py

clean:
	rm -rf $(VENV) $(SEQIO_VENV) $(OLDEST_VENV) demo_out runs/demo-*
