# fewstep developer tasks (GNU make). `make test` is what CI runs.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

# the suite must pass without a network: hubs stay offline, fewstep's tests refuse connections
TEST_ENV := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 FEWSTEP_NO_NETWORK=1

.PHONY: venv test demo results clean distclean

venv: $(STAMP)

# re-installs only when pyproject.toml changes (the package itself is an editable install)
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[test]'
	@touch $@

# quiet output and the 15 slowest tests come from pyproject's addopts; a second -q would hide the summary line.
# One worker per core, each taking whole files (a file's module fixtures are built once): on 2 cores the suite
# took 301 s this way against 482 s in one process
PARALLEL    := -n auto --dist loadfile
PYTEST_ARGS ?=
test: venv
	$(TEST_ENV) $(PY) -m pytest $(PARALLEL) $(PYTEST_ARGS)

demo: venv
	$(VENV)/bin/fewstep demo

# the benchmark tables and figures of docs/results.md (hours on a CPU; finished rows are reused)
BENCH_ROOT ?= bench
results: venv
	$(PY) -c 'from fewstep.results_page import RESULT_PRESETS, bench_command; print(*(bench_command(p, "$(BENCH_ROOT)") for p in RESULT_PRESETS), sep="\n")' \
		| while read -r cmd; do $(VENV)/bin/$$cmd </dev/null || exit 1; done
	$(PY) scripts/results_doc.py --bench-root $(BENCH_ROOT) --out docs

clean:
	rm -rf build dist .pytest_cache src/*.egg-info demo-out
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
