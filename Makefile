# The two set-up commands of the README. Both create .venv and install what they need: the demo
# only the pipeline's dependencies (the test tools add about 30 s), the tests those and the test
# tools. A re-run into an existing venv only re-installs when pyproject.toml changed.
PY      := .venv/bin/python
RUNTIME := .venv/.runtime
DEV     := .venv/.dev
TORCH   := torch==2.13.0

.PHONY: demo test bench lint

$(PY):
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip

# torch pinned in the same call: unpinned, a dependency would pull a CUDA build of several GB
$(RUNTIME): pyproject.toml | $(PY)
	$(PY) -m pip install -q $(TORCH) -e .
	touch $(RUNTIME)

$(DEV): $(RUNTIME)
	$(PY) -m pip install -q $(TORCH) -e '.[dev]'
	touch $(DEV)

demo: $(RUNTIME)
	$(PY) jobs/run_pipeline.py --out demo/out

test: $(DEV)
	RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 $(PY) -m pytest -q --durations=8

# Benchmarks print tables and write bench/results/*.json (over an hour on 2 cores, most of it
# scale.py; run them on a quiet machine). The streaming ones reuse the segmenter of a finished
# `make demo`.
bench: $(RUNTIME)
	$(PY) bench/geometry_accuracy.py
	$(PY) bench/flops.py
	$(PY) bench/stream_vs_loop.py
	$(PY) bench/scale.py
	$(PY) bench/training.py
	$(PY) bench/convergence_criterion.py

lint: $(DEV)
	.venv/bin/ruff check .
