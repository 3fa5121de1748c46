# Everything a fresh machine needs: `make serve` and `make test` each set up what they use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
WOOLLY := $(VENV)/bin/woolly
# STAMP: the package, what `make serve` needs; TEST_STAMP: plus the test tools, llama.cpp
# (the oracle, built from source by pip) and plotting for `woolly bench`.
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

.PHONY: install models serve test test-fast reliability bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(PY) -m pip install --quiet --disable-pip-version-check -e .
	touch $(STAMP)

$(TEST_STAMP): $(STAMP)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev,peer,bench]'
	touch $(TEST_STAMP)

install: $(TEST_STAMP)

models: $(TEST_STAMP)
	$(WOOLLY) pull smollm2-135m-instruct
	$(WOOLLY) pull gemma3-270m

serve: $(STAMP)
	$(WOOLLY) pull smollm2-135m-instruct
	$(WOOLLY) serve

# Everything but the reliability suite's long runs (100 cancels, 2,000-request memory soak),
# which `make reliability` adds.
test: models
	$(PY) -m pytest -q tests -m "not (slow and reliability)"

test-fast: $(TEST_STAMP)
	$(PY) -m pytest -q tests -m "not real and not slow"

# reliability.md, every line: tests/reliability (slow tests included) and the existing tests its
# catalogue names; writes the summary table to tests/reliability/README.md.
reliability: models
	PYTHONPATH=tests/reliability WOOLLY_FUZZ_EXAMPLES=$${WOOLLY_FUZZ_EXAMPLES:-10} $(PY) -m pytest -q -p rel_report \
		--reliability-report=tests/reliability/README.md tests/reliability $$($(PY) tests/reliability/catalog.py)

# benchmarks/README.md's figures: each model and residency against llama.cpp (both peers) in one
# run each. REPEATS=1 for a short run; KERNELS=xla for the XLA-only fallback; PEER_LIB=DIR for
# another libllama.so (an AVX2-only build); MODELS, RESIDENCIES to narrow it.
bench: models
	WOOLLY=$(WOOLLY) PY=$(PY) benchmarks/run.sh

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
