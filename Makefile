# Convenience targets; each is a command from README.md. Needs only python3 (and make).
PY := .venv/bin/python

.PHONY: install dev train test test-all test-slow bench clean

install:            ## create .venv with regkit and its dependencies
	python3 scripts/bootstrap.py

dev:                ## ... plus the test tools
	python3 scripts/bootstrap.py --dev

train: install      ## the main job: train on the embedded synthetic dataset
	$(PY) train.py

test: dev           ## the fast tests (what CI runs)
	$(PY) -m pytest

test-slow: dev      ## slow tests only (full-size models, longer training)
	$(PY) -m pytest -m slow

test-all: dev       ## every test that this machine can run (GPU tests skip without CUDA)
	$(PY) -m pytest -m "slow or not slow"

bench: install      ## loss benchmark, results in docs/benchmarks.md
	$(PY) scripts/bench_loss.py --out docs/benchmarks.md

clean:
	rm -rf outputs multirun data/generated .pytest_cache
