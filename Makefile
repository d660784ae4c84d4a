# Everything installs into .venv in the repository root. `make main` and `make test` are the quick start.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Flowers-102 is looked for in $(DATA_ROOT) if set, else ../shared/data, else ./data; if none has it,
# `make main` downloads it into ./data (scripts/prepare_flowers102.py).
FIND_DATA = for root in $(DATA_ROOT) ../shared/data data; do \
	  if [ -f "$$root/flowers102/labels.csv" ]; then echo "$$root"; break; fi; done

.PHONY: venv test main baselines ablation bench clean

# The pinned stack (requirements*.txt), then this repository itself, editable, as the msretrieval package.
$(VENV)/.installed: requirements.txt requirements-dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

venv: $(VENV)/.installed

test: venv
	$(PY) -m pytest -q

# The main job: a short real training run on Flowers-102 that ends in the evaluation table.
main: venv
	@root=$$($(FIND_DATA)); \
	if [ -z "$$root" ]; then \
	  echo "Flowers-102 not found in $(or $(DATA_ROOT),../shared/data or ./data): downloading it into ./data"; \
	  $(PY) scripts/prepare_flowers102.py || exit 2; root=data; \
	fi; \
	$(PY) train.py --data-root "$$root"

baselines: venv
	@root=$$($(FIND_DATA)); $(PY) scripts/evaluate.py --data-root "$${root:-data}" --benchmark flowers102 \
		--together --method gem --method gap --method scda --method scda_plus --method scda_flip_plus \
		--backbone tf_efficientnet_lite0 --out runs/baselines/results.json

# The README's ablation (head, miner, training resolution at the main job's budget; ~1 h 50 min on 2 cores).
ablation: venv
	@root=$$($(FIND_DATA)); $(PY) scripts/ablation.py --data-root "$${root:-data}"

bench: venv
	$(PY) scripts/bench_metrics.py

clean:
	rm -rf $(VENV) .pytest_cache
