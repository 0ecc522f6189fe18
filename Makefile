# Two commands do all set-up: `make test` and `make demo` (each creates .venv/ if missing).
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: test test-seqio demo venv benchmark clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev]"
	@rm -f $(VENV)/.installed-*
	@touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadgroup -q tests

# seqio needs full TensorFlow (~3 GB), so its tests get a venv of their own;
# CI runs them (.ci/run), where a missing seqio fails instead of skipping.
SEQIO_VENV := .venv-seqio
$(SEQIO_VENV)/.installed: pyproject.toml
	@test -x $(SEQIO_VENV)/bin/python || $(PY) -m venv $(SEQIO_VENV) || python3 -m venv $(SEQIO_VENV)
	$(SEQIO_VENV)/bin/python -m pip install -q --upgrade pip
	$(SEQIO_VENV)/bin/python -m pip install -q -e ".[train,seqio]" pytest
	@touch $@

test-seqio: $(SEQIO_VENV)/.installed
	LRO_REQUIRE_SEQIO=1 $(SEQIO_VENV)/bin/python -m pytest -q tests/test_data_seqio.py

demo: $(STAMP)
	$(BIN)/python -m train --config demo --run_dir runs/demo-$$(date +%Y%m%d-%H%M%S)

benchmark: $(STAMP)
	$(BIN)/python benchmarks/optimizer_step.py

clean:
	rm -rf $(VENV) $(SEQIO_VENV) demo_out
