# Everything installs into .venv in the repository root. `make main` and `make test` are the quick start.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DATA_ROOT ?= ../shared/data

.PHONY: venv test main baselines bench clean

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

venv: $(VENV)/.installed

test: venv
	$(PY) -m pytest -q

# The main job: a short real training run on Flowers-102 that ends in the evaluation table.
main: venv
	$(PY) train.py --data-root $(DATA_ROOT)

baselines: venv
	$(PY) scripts/evaluate.py --data-root $(DATA_ROOT) --benchmark flowers102 --together \
		--method gem --method gap --method scda --method scda_plus --method scda_flip_plus \
		--backbone tf_efficientnet_lite0 --out runs/baselines/results.json

bench: venv
	$(PY) scripts/bench_metrics.py

clean:
	rm -rf $(VENV) .pytest_cache
