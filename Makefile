# The README's two commands: `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
TORCH_VERSION := 2.13.0

.PHONY: demo test lint typecheck pytest system-deps test-system-deps install clean

demo: install
	$(VENV)/bin/autodl-hub demo

test: install test-system-deps lint typecheck pytest

# apt packages the project runs: mosquitto (the broker the hub supervises and the tests start).
system-deps:
	@command -v mosquitto >/dev/null || { $(SUDO) apt-get update -q && $(SUDO) DEBIAN_FRONTEND=noninteractive apt-get install -y -q mosquitto; }
	@[ -x /usr/sbin/mosquitto ] || command -v mosquitto >/dev/null

# Chromium: the dashboard's browser tests drive it through Playwright (no browser download).
# promtool (Debian's prometheus package): the alert rules and both /metrics outputs are checked with it.
test-system-deps:
	@[ -x /usr/bin/chromium ] || { $(SUDO) apt-get update -q && $(SUDO) DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; }
	@command -v promtool >/dev/null || { $(SUDO) apt-get update -q && $(SUDO) DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus; }

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -m venv $(VENV) 2>/dev/null || { $(SUDO) apt-get update -q && $(SUDO) DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-venv && $(PYTHON) -m venv $(VENV); }
	$(PIP) install -q --upgrade pip
	# The pinned CPU wheel first: a plain torch requirement would pull a multi-GB CUDA build.
	$(PIP) install -q torch==$(TORCH_VERSION)
	$(PIP) install -q -e '.[hub,agent,image,dev]'
	touch $@

install: system-deps $(VENV)/.installed

lint:
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck:
	$(VENV)/bin/mypy shared hub agent

pytest:
	$(VENV)/bin/pytest -q

# The fault-injection suite with 20 randomized runs of each repeated fault, and schemathesis on the API.
faults: install
	AUTODL_FAULT_RUNS=20 $(VENV)/bin/pytest -q tests/faults tests/hub/test_schemathesis.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
