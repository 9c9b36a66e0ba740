# shortcut-audit: `make audit` runs the demo end to end, `make test` runs the tests.
# Both create .venv and install the project (with its test extras) the first time.

PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# Quiet, offline Prefect with its state inside the project (see README, "Prefect").
export PREFECT_HOME := $(CURDIR)/.prefect
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 180
# OpenMP's spin-waiting made 2-thread forward passes up to 10x slower on shared 2-core machines.
export OMP_WAIT_POLICY := PASSIVE

DEMO_DATA := reports/demo-data
DEMO_OUT := reports/demo

.PHONY: all install browser audit audit-cxr serve test lint bench bench-pipeline bench-report bench-quick eval-regions clean

all: test

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# pip (not uv), so the machine's local torch wheels are used.
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

audit: $(STAMP)
	$(BIN)/audit demo --out $(DEMO_DATA) --shortcut-rate 0.9 --n 600 --seed 0
	$(BIN)/audit run --data $(DEMO_DATA) --out $(DEMO_OUT) $(AUDIT_ARGS)

# The demo audit every night at 02:00 UTC as a Prefect deployment (README, "Scheduled audits"); stop it with Ctrl-C.
# Schedules need a Prefect server: run `$(BIN)/prefect server start` in another terminal first, then
# `make serve PREFECT_API_URL=http://127.0.0.1:4200/api` (or export PREFECT_API_URL). SERVE_CRON changes the time.
SERVE_CRON ?= 0 2 * * *
serve: $(STAMP)
	$(BIN)/audit demo --out $(DEMO_DATA) --shortcut-rate 0.9 --n 600 --seed 0
	$(BIN)/audit serve --cron "$(SERVE_CRON)" --name nightly-demo --data $(DEMO_DATA) --out $(DEMO_OUT) $(SERVE_ARGS)

# Debian's Chromium for the report's browser test (tests/report/test_browser.py). Installed with apt-get where this
# runs as root on Debian; anywhere else the test is skipped and says why.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	      || echo "could not install chromium: the browser test will be skipped"; \
	  else echo "chromium is not installed (apt-get install chromium): the browser test will be skipped"; fi; }

test: $(STAMP) browser
	$(BIN)/python -m pytest -q

# Saliency throughput ratios (README, "Benchmarks"); about 20 minutes on the 2-core CPU machine. Then the pipeline.
bench: $(STAMP)
	$(BIN)/python -m benchmarks.saliency $(BENCH_ARGS)
	$(BIN)/python -m benchmarks.pipeline $(BENCH_ARGS)

# The whole audit against the saliency engine, its peak memory, resume and Dask (reports/bench/pipeline.json).
bench-pipeline: $(STAMP)
	$(BIN)/python -m benchmarks.pipeline $(BENCH_ARGS)

# The report of a 2,000-image demo audit: size against the budget, render time in Chromium, docs/report.png.
bench-report: $(STAMP) browser
	$(BIN)/python -m benchmarks.report $(BENCH_REPORT_ARGS)

bench-quick: $(STAMP)
	$(BIN)/python -m benchmarks.saliency --quick --rounds 2 $(BENCH_ARGS)

# Region detectors against the hand-drawn boxes of the real radiographs in ../shared/data/cxr-real.
CXR_REAL ?= ../shared/data/cxr-real

# A probe told to separate Hannover from Kermany radiographs (README, "Real radiographs"): does it use the markers?
audit-cxr: $(STAMP)
	$(BIN)/python -m audit.data.cxr_real $(CXR_REAL) reports/cxr-real/manifest.csv
	$(BIN)/audit run --data $(CXR_REAL) --manifest reports/cxr-real/manifest.csv --out reports/cxr-real \
		--probe-size 128 --probe-epochs 40 $(AUDIT_ARGS)
eval-regions: $(STAMP)
	$(BIN)/audit eval-regions --root $(CXR_REAL) --boxes $(CXR_REAL)/regions.csv --json reports/bench/regions.json $(EVAL_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check audit flows tests

clean:
	rm -rf $(DEMO_DATA) $(DEMO_OUT) .pytest_cache
