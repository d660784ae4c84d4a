# Everything installs into .venv in the repository root. `make main` and `make test` are the quick start.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DATA_ROOT ?= ../shared/data

.PHONY: venv test main evaluate bench clean

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

venv: $(VENV)/.installed

test: venv
	$(PY) -m pytest -q

# Until train.py lands, the main job evaluates the pretrained baselines on Flowers-102.
main: venv
	$(PY) scripts/evaluate.py --data-root $(DATA_ROOT) --benchmark flowers102 \
		--method gem --method gap --backbone tf_efficientnet_lite0 --out runs/baselines/results.json

bench: venv
	$(PY) scripts/bench_metrics.py

clean:
	rm -rf $(VENV) .pytest_cache
