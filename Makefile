# recoplatform developer entry points. `make demo` and `make test` work on a fresh clone.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PORT ?= 8000
HOST ?= 127.0.0.1
MANAGE := $(BIN)/python manage.py
# Demo sizes; override e.g. `make demo DEMO_ACTIONS=5000000`.
DEMO_USERS ?= 2000
DEMO_ITEMS ?= 500
DEMO_ACTIONS ?= 200000
DEMO_SEED ?= 42
PROM_DIR ?= var/prometheus

.PHONY: help audit serving-load system-deps venv migrate experiments demo-data pipeline admin-user demo-setup demo demo-check serve schedules worker beat \
        test lint format pytest check-sources clean-data benchmarks quality quality-movielens reliability

help:  ## list targets
	@grep -E '^[a-z-]+:.*##' Makefile | sed 's/:.*##/\t/'

system-deps:  ## install Debian packages: a C compiler and MySQL client headers (mysqlclient; benchmarks/loadgen), Chromium + ChromeDriver (admin browser tests), promtool/amtool (monitoring config tests); needs root
	@missing=""; \
	command -v cc >/dev/null || missing="$$missing gcc libc6-dev"; \
	pkg-config --exists mysqlclient 2>/dev/null || pkg-config --exists libmariadb 2>/dev/null || missing="$$missing libmariadb-dev pkg-config"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	command -v chromedriver >/dev/null || missing="$$missing chromium-driver"; \
	command -v promtool >/dev/null || missing="$$missing prometheus"; \
	command -v amtool >/dev/null || missing="$$missing prometheus-alertmanager"; \
	if [ -z "$$missing" ]; then \
		echo "system-deps: all present"; \
	elif [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null; then \
		echo "system-deps: installing$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	else \
		echo "system-deps: install these Debian packages first: sudo apt-get install$$missing" >&2; exit 1; \
	fi

# SEMANTIC=0 skips the semantic recall channel's requirements (torch; the CPU build of
# torch 2.13.0 is on this project's machines' disk, elsewhere pip would download it).
SEMANTIC ?= 1

$(BIN)/.installed: requirements.txt requirements-dev.txt requirements-semantic.txt
	@$(MAKE) --no-print-directory system-deps
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements-dev.txt
	@if [ "$(SEMANTIC)" = "1" ]; then $(BIN)/pip install -q -r requirements-semantic.txt; fi
	@touch $@

venv: $(BIN)/.installed  ## create .venv and install pinned requirements

migrate: venv  ## create/upgrade Django's tables
	$(MANAGE) migrate --noinput -v 0

demo-data: venv  ## write the demo business + Matomo databases (SQLite by default)
	$(MANAGE) make_demo_data --reset --users $(DEMO_USERS) --items $(DEMO_ITEMS) \
		--actions $(DEMO_ACTIONS) --seed $(DEMO_SEED)

check-sources: venv  ## validate config/sources.yaml against the live source databases
	$(MANAGE) check_sources

pipeline: venv  ## run every pipeline stage once (extract, canonicalize, quality, clean, train)
	$(MANAGE) run_pipeline --kind full --triggered-by make

admin-user: venv  ## create or reset the demo admin user and print its credentials
	$(MANAGE) ensure_admin

experiments: venv  ## load the seed experiments from config/experiments.yaml (idempotent)
	$(MANAGE) experiments_import

schedules: venv  ## write the pipeline's beat schedules to the database (keeps enabled/disabled)
	$(MANAGE) sync_schedules

worker: venv  ## a Celery worker (needs CELERY_BROKER_URL, e.g. redis://127.0.0.1:6379/1)
	$(BIN)/celery -A recoplatform worker --loglevel=INFO --concurrency=2

beat: venv  ## the one Celery beat (database scheduler)
	$(BIN)/celery -A recoplatform beat --loglevel=INFO

demo-setup: venv migrate experiments schedules demo-data check-sources pipeline admin-user

demo: demo-setup  ## fresh clone -> demo data, pipeline, admin user, server on http://$(HOST):$(PORT)/
	@echo "Serving on http://$(HOST):$(PORT)/admin/ (Ctrl-C to stop)"
	$(MANAGE) runserver $(HOST):$(PORT)

serve: venv  ## production server (gunicorn, one sync worker per core) on $(HOST):$(PORT)
	@rm -rf $(PROM_DIR) && mkdir -p $(PROM_DIR)
	DJANGO_DEBUG=$${DJANGO_DEBUG:-0} DJANGO_SECRET_KEY=$${DJANGO_SECRET_KEY:-local-serve-key-change-me} \
	PROMETHEUS_MULTIPROC_DIR=$(PROM_DIR) RECO_BIND=$(HOST):$(PORT) \
	$(BIN)/gunicorn -c gunicorn.conf.py recoplatform.wsgi:application

demo-check: demo-setup  ## the demo, unattended: start the server, probe it, stop it
	$(BIN)/python scripts/demo_check.py --host $(HOST) --port $(PORT)

lint: venv  ## ruff check + format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: venv  ## apply ruff fixes and formatting
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

pytest: venv
	$(BIN)/pytest -q

test: lint pytest  ## ruff + the whole test suite

RELIABILITY_SITE ?= var/reliability-site
SOAK_SECONDS ?= 600

reliability: venv  ## long serving runs: overload at 2x capacity (~6 min), soak at half of it for SOAK_SECONDS (600); JSON in benchmarks/results/
	$(BIN)/python -m benchmarks.reliability_overload --site $(RELIABILITY_SITE)
	$(BIN)/python -m benchmarks.reliability_soak --site $(RELIABILITY_SITE) --duration $(SOAK_SECONDS)

SERVING_REDIS_URL ?= redis://127.0.0.1:6379/0
SERVING_SWEEP ?= 450,600,750,900,1200,1500

serving-load: venv  ## the API under open-loop load, full path beside a bare baseline, at 300 rps then SERVING_SWEEP (needs the demo: make demo-setup; publishes to SERVING_REDIS_URL); JSON in benchmarks/results/serving_load.json
	REDIS_URL=$(SERVING_REDIS_URL) $(MANAGE) sync_redis
	REDIS_URL=$(SERVING_REDIS_URL) $(BIN)/python -m benchmarks.serving_load --rate 300 --sweep $(SERVING_SWEEP) --duration 15

benchmarks: venv  ## pipeline benchmarks (long; results in benchmarks/results/)
	$(BIN)/python -m benchmarks.extract_throughput
	$(BIN)/python -m benchmarks.demo_data --actions 5000000

quality: venv  ## recommendation quality: UCI Online Retail (stratified) + demo data (time, stratified); JSON in benchmarks/results/
	$(BIN)/python -m benchmarks.quality --dataset uci
	$(BIN)/python -m benchmarks.quality --dataset demo

ML100K ?= var/datasets/ml-100k

quality-movielens: venv  ## MovieLens-100K (fetched from the RecBole wheel on PyPI), stratified protocol; JSON in benchmarks/results/
	$(BIN)/python scripts/fetch_movielens.py --out $(ML100K)
	$(BIN)/python -m benchmarks.quality --dataset movielens --path $(ML100K)

AUDIT_VENV ?= var/audit-venv

audit:  ## supply-chain audit (pip-audit --strict, its own venv; needs its online database): CLEAN, VULNERABLE or NOT RUN, JSON in benchmarks/results/
	test -x $(AUDIT_VENV)/bin/pip-audit || (python3 -m venv $(AUDIT_VENV) && $(AUDIT_VENV)/bin/pip install -q pip-audit)
	$(AUDIT_VENV)/bin/python scripts/supply_chain_audit.py

clean-data:  ## remove the local data directory (var/)
	rm -rf var
