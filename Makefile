# Two commands: `make serve` (install + start on the bundled model) and `make test`.
SHELL := bash
.SHELLFLAGS := -eo pipefail -c
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
HOST ?= 127.0.0.1
PORT ?= 8000
ARGS ?=

.PHONY: install install-test serve test test-all lint clean chromium bench-deps bench-serving bench-multiturn

$(PY):
	python3 -m venv $(VENV)
	$(PIP) install -q -U pip

# torch first, pinned, so that nothing later pulls a newer (CUDA) build.
$(VENV)/.torch: | $(PY)
	$(PIP) install -q torch==2.13.0
	touch $@

# llama-cpp-python compiles llama.cpp (~5 min on 2 cores) into a wheel kept in $(WHEEL_DIR), so
# later installs take seconds. -march=native, but without AMX: Linux refuses AMX tiles to
# processes here (SIGILL in ggml's AMX kernels), while the CPU advertises them.
LLAMA_VERSION := 0.3.36
WHEEL_DIR ?= $(HOME)/.cache/easllm/wheels
NO_AMX := -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
$(VENV)/.llama: $(VENV)/.torch
	@if ! ls $(WHEEL_DIR)/llama_cpp_python-$(LLAMA_VERSION)-*.whl >/dev/null 2>&1; then \
	  echo ">> compiling llama.cpp for llama-cpp-python $(LLAMA_VERSION) (about 5 minutes on 2 cores)"; \
	  CFLAGS="$(NO_AMX)" CXXFLAGS="$(NO_AMX)" $(PIP) wheel -v --no-deps --no-cache-dir -w $(WHEEL_DIR) \
	    'llama-cpp-python==$(LLAMA_VERSION)' 2>&1 \
	    | grep --line-buffered -E '^\s*\[[0-9]+/[0-9]+\]|Saved|ERROR|error:' \
	    | sed -u -E 's/^\s*\[([0-9]+)\/([0-9]+)\].*/   llama.cpp build step \1 of \2/'; \
	fi
	$(PIP) install -q --find-links $(WHEEL_DIR) 'llama-cpp-python==$(LLAMA_VERSION)'
	$(PY) -c 'import llama_cpp' || { echo "llama-cpp-python failed to install"; exit 1; }
	touch $@

$(VENV)/.installed: pyproject.toml $(VENV)/.llama
	$(PIP) install -q -e .
	touch $@

$(VENV)/.test-installed: $(VENV)/.installed
	$(PIP) install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.test-installed

serve: install
	$(VENV)/bin/easllm serve --host $(HOST) --port $(PORT) $(ARGS)

# The browser tests drive Debian's Chromium through Playwright (never `playwright install`).
# Installed here when missing and possible (root, or passwordless sudo); otherwise they skip.
CHROMIUM ?= /usr/bin/chromium
chromium:
	@if [ ! -x $(CHROMIUM) ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt=apt-get; else apt="sudo -n apt-get"; fi; \
	  echo ">> installing Debian's chromium for the browser tests"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  $$apt install -y -q chromium >/dev/null 2>&1 \
	    || { $$apt update -q >/dev/null 2>&1 && $$apt install -y -q chromium >/dev/null 2>&1; } \
	    || echo ">> chromium could not be installed here: the browser tests will skip"; \
	fi

# `make test` keeps the suite within ~15 minutes on 2 cores: everything but the tests marked
# `slow` (extra runs of the default Qwen model); `make test-all` runs those too.
test: install-test chromium
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

test-all: install-test chromium
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q $(PYTEST_ARGS)

# The serving benchmark's peers: llama-cpp-python's own server (its [server] extra, two small
# packages) and llama.cpp's llama-server, which bench/peers.py builds once (~12 min) outside the repo.
bench-deps: $(VENV)/.installed
	$(PIP) install -q --find-links $(WHEEL_DIR) 'llama-cpp-python[server]==$(LLAMA_VERSION)'
	$(PY) bench/peers.py

bench-serving: bench-deps
	HF_HUB_OFFLINE=1 $(PY) bench/serving.py $(BENCH_ARGS)

bench-multiturn: bench-deps
	HF_HUB_OFFLINE=1 $(PY) bench/multiturn.py $(BENCH_ARGS)

lint: install-test
	$(VENV)/bin/ruff check easllm tests bench
	$(VENV)/bin/ruff format --check easllm tests bench
	$(VENV)/bin/mypy  # easllm/, configured in pyproject.toml
	$(VENV)/bin/lint-imports  # the layer contracts in pyproject.toml

clean:
	rm -rf $(VENV) .pytest_cache
