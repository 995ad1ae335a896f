# The two set-up commands of the README. Both create .venv and install what they need;
# a re-run into an existing venv only re-installs when pyproject.toml changed.
PY      := .venv/bin/python
STAMP   := .venv/.installed
TORCH   := torch==2.13.0

.PHONY: demo test bench lint

$(PY):
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) jobs/run_pipeline.py --out demo/out

test: $(STAMP)
	RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 $(PY) -m pytest -q --durations=8

# Benchmarks print tables and write bench/results/*.json (over an hour on 2 cores, most of it
# scale.py; run them on a quiet machine). The streaming ones reuse the segmenter of a finished
# `make demo`.
bench: $(STAMP)
	$(PY) bench/geometry_accuracy.py
	$(PY) bench/flops.py
	$(PY) bench/stream_vs_loop.py
	$(PY) bench/scale.py
	$(PY) bench/training.py
	$(PY) bench/convergence_criterion.py

lint: $(STAMP)
	.venv/bin/ruff check .
