# fiber-edge: one-command set-up, tests, data, training recipes, export and reports.
# Every target uses the project's virtual environment in .venv (made by `make setup`).
PY ?= .venv/bin/python
PIP ?= .venv/bin/pip
# The CPU install path: torch 2.13.0 (CPU build) first, so nothing pulls a multi-GB CUDA torch.
TORCH_CPU ?= torch==2.13.0

.PHONY: setup test test-fast native clean

setup: .venv/.installed

.venv/.installed: pyproject.toml setup.py
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_CPU)
	$(PIP) install -q -e ".[train,compress,trt,video,text,bench,dev]"
	touch $@

native:
	$(PY) setup.py -q build_ext --inplace

test: setup
	$(PY) -m pytest -q tests

test-fast: setup
	$(PY) -m pytest -q -m "not slow" tests

clean:
	rm -rf build runtime/*.so .pytest_cache
