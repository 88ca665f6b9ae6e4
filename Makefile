# Two commands do all the set-up: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# CPU build of torch; GPU users install their torch first and run `make setup TORCH=`.
TORCH ?= torch==2.13.0
# What the tests use: the server (serve), GGUF files (gguf) and lm-evaluation-harness (eval).
EXTRAS := dev,serve,gguf,eval

.PHONY: setup demo test test-slow lint format bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH) -e '.[$(EXTRAS)]'
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) -m scratchlm pipeline recipes/tiny.toml --run-dir runs/tiny

# The Ray tests need the ray extra; they share one Ray instance, so they run in one xdist group.
$(VENV)/.installed-ray: $(VENV)/.installed
	$(PY) -m pip install -q $(TORCH) -e '.[$(EXTRAS),ray]'
	touch $@

test: $(VENV)/.installed-ray
	$(PY) -m pytest -q -n 2 --dist loadgroup

# The slow tests include DeepSpeed, a two-node Ray cluster and llama.cpp (llama-cpp-python builds
# from source, about 6.5 minutes on 2 cores the first time), optional extras.
$(VENV)/.installed-deepspeed: $(VENV)/.installed-ray
	$(PY) -m pip install -q $(TORCH) -e '.[$(EXTRAS),ray,deepspeed,llamacpp]'
	touch $@

test-slow: $(VENV)/.installed-deepspeed
	$(PY) -m pytest -q -m slow

lint: setup
	$(PY) -m ruff check scratchlm tests bench
	$(PY) -m ruff format --check scratchlm tests bench

format: setup
	$(PY) -m ruff format scratchlm tests bench
	$(PY) -m ruff check --fix scratchlm tests bench

clean:
	rm -rf runs .pytest_cache
