# Two commands do all the set-up: `make demo` runs the method end to end, `make test` runs the tests.
# Both create .venv on a fresh machine. TORCH pins the build: 2.13.0 is the CPU wheel on CI machines
# and PyPI's CUDA build elsewhere; override with `make test TORCH=torch==X.Y.Z`.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test demo bench bench-verify clean

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check $(TORCH)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt -r requirements-dev.txt
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

demo: $(STAMP)
	$(PY) -m scripts.demo --out runs/demo

bench: $(STAMP)
	$(PY) -m scripts.bench --device cpu --quick

bench-verify: $(STAMP)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-bench.txt
	$(PY) -m scripts.bench_verify

clean:
	rm -rf $(VENV) runs .pytest_cache
