# Two commands do all the set-up: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# CPU build of torch; GPU users install their torch first and run `make setup TORCH=`.
TORCH ?= torch==2.13.0
# What the tests use: the server (serve), GGUF files (gguf) and lm-evaluation-harness (eval).
EXTRAS := dev,serve,gguf,eval
# The exact version of every dependency (torch aside, pinned by TORCH) that the last green CI used,
# so that a fresh clone installs what was tested. pyproject.toml keeps ranges for `pip install`;
# `make upgrade` moves these pins deliberately.
CONSTRAINTS := constraints.txt
PIP_INSTALL = $(PY) -m pip install -q -c $(CONSTRAINTS)

.PHONY: setup demo test test-slow lint format upgrade clean

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) --upgrade pip
	$(PIP_INSTALL) $(TORCH) -e '.[$(EXTRAS)]'
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) -m scratchlm pipeline recipes/tiny.toml --run-dir runs/tiny

# The Ray tests need the ray extra; they share one Ray instance, so they run in one xdist group.
$(VENV)/.installed-ray: $(VENV)/.installed
	$(PIP_INSTALL) $(TORCH) -e '.[$(EXTRAS),ray]'
	touch $@

test: $(VENV)/.installed-ray
	$(PY) -m pytest -q -n 2 --dist loadgroup

# The slow tests include DeepSpeed, a two-node Ray cluster and llama.cpp (llama-cpp-python builds
# from source, about 6.5 minutes on 2 cores the first time), optional extras.
$(VENV)/.installed-deepspeed: $(VENV)/.installed-ray
	$(PIP_INSTALL) $(TORCH) -e '.[$(EXTRAS),ray,deepspeed,llamacpp]'
	touch $@

test-slow: $(VENV)/.installed-deepspeed
	$(PY) -m pytest -q -m slow

lint: setup
	$(PY) -m ruff check scratchlm tests bench
	$(PY) -m ruff format --check scratchlm tests bench

format: setup
	$(PY) -m ruff format scratchlm tests bench
	$(PY) -m ruff check --fix scratchlm tests bench

# Moves every pin in constraints.txt to the newest release that pyproject.toml's ranges allow, in a
# new .venv, then runs both test suites on it. Commit constraints.txt only when they pass.
upgrade:
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH) -e '.[$(EXTRAS),ray,deepspeed,llamacpp]'
	{ echo '# The versions the last green CI used, written by make upgrade (torch: TORCH in Makefile).'; \
	  $(PY) -m pip list --format=freeze --exclude-editable | grep -viE '^(torch|scratchlm)=='; \
	} > $(CONSTRAINTS)
	touch $(VENV)/.installed $(VENV)/.installed-ray $(VENV)/.installed-deepspeed
	$(MAKE) test test-slow

clean:
	rm -rf runs .pytest_cache
