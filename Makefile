# qmoe developer tasks. `make test` is what CI runs (.ci/run) on a fresh machine.
PYTHON ?= python3
PIP = $(PYTHON) -m pip

.PHONY: install test demo bench

# Keeps an existing torch (e.g. a CUDA build); otherwise installs the 2.13.0 wheel, which is a
# small CPU build where a local wheel exists and the default build elsewhere.
install:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install --quiet "torch==2.13.0"
	$(PIP) install --quiet -e ".[test]"

# pyproject's addopts already give -q (a second one would hide the "N passed" line); -rfEs ends
# with one line per failed test, per error and per skipped test with its reason (on a machine
# without a GPU: the GPU tests). Two workers (pytest-xdist) of one CPU thread each: the suite is
# ~7 CPU-minutes of mostly single-threaded work, so 2 workers halve its wall time on 2 cores
# (6.4 min vs 9.5 min in one process with 2 threads, measured on an idle 2-core machine); the
# tests pass either way (`python -m pytest tests` runs them in one process).
test: install
	OMP_NUM_THREADS=1 $(PYTHON) -m pytest -n 2 -p no:cacheprovider -rfEs tests

bench:
	$(PYTHON) scripts/bench_gptq.py --shapes 768x3072,3072x768 --experts 4
