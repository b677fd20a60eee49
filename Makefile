# Two commands do all the set-up: `make demo` runs the method end to end, `make test` runs the tests.
# Both create .venv on a fresh machine. `make install` makes the venv a researcher runs the paper with
# (README, "Reproducing the paper"): the tests' packages plus the download clients. TORCH pins the build:
# 2.13.0 is the CPU wheel on CI machines and PyPI's CUDA build elsewhere; override with `make test TORCH=torch==X.Y.Z`.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test demo bench bench-verify gpu-check clean

$(STAMP): requirements.txt requirements-dev.txt requirements-demo.txt requirements-tracking.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check $(TORCH)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt -r requirements-dev.txt
	touch $(STAMP)

install: $(STAMP)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-download.txt
	@echo "installed: activate with '. $(VENV)/bin/activate' (or call $(VENV)/bin/python)"

test: $(STAMP)
	$(PY) -m pytest -q tests

demo: $(STAMP)
	$(PY) -m scripts.demo --out runs/demo --fresh

bench: $(STAMP)
	$(PY) -m scripts.bench --device cpu --quick

bench-verify: $(STAMP)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-bench.txt
	$(PY) -m scripts.bench_verify

# Everything that needs a GPU (tests/test_gpu.py, training and decode benchmarks at the 1.5B shape), in about
# eleven minutes on one H100/H200, into one report: runs/gpu_check/report.json. Without CUDA: says so, exits 0.
# Where one command may run 10 minutes at most, split it: `.venv/bin/python -m scripts.gpu_check --parts tests,train
# --out runs/gpu_check/a`, then `--parts decode --out runs/gpu_check/b`.
gpu-check: $(STAMP)
	$(PY) -m scripts.gpu_check --out runs/gpu_check

clean:
	rm -rf $(VENV) runs .pytest_cache
