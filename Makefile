# Everything installs into .venv in the repository root. `make main` and `make test` are the quick start.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Flowers-102 is looked for in $(DATA_ROOT) if set, else ../shared/data, ./data, ./datasets (the order of
# data/roots.py); if none has it, `make main` downloads it into $(DATA_ROOT) if set, else ./datasets
# (scripts/prepare_flowers102.py; ./data is the `data` package, so nothing is downloaded into it).
FIND_DATA = for root in $(DATA_ROOT) ../shared/data data datasets; do \
	  if [ -f "$$root/flowers102/labels.csv" ]; then echo "$$root"; break; fi; done
DOWNLOAD_ROOT = $(or $(DATA_ROOT),datasets)

.PHONY: venv test main baselines ablation bench clean

# The pinned stack (requirements*.txt), then this repository itself, editable, as the msretrieval package.
# GPU=1 (`make venv GPU=1`, once): FAISS's CUDA build replaces faiss-cpu (both install the `faiss` module, so
# both are removed first); the marker keeps it through later reinstalls.
GPU_FAISS := $(VENV)/.gpu-faiss
SWAP_FAISS = $(PY) -m pip uninstall --quiet -y faiss-cpu faiss-gpu && \
	$(PY) -m pip install --quiet -r requirements-gpu.txt && touch $(GPU_FAISS)

$(VENV)/.installed: requirements.txt requirements-dev.txt requirements-gpu.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	if [ -n "$(GPU)" ] || [ -f $(GPU_FAISS) ]; then $(SWAP_FAISS); fi
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

venv: $(VENV)/.installed
	@if [ -n "$(GPU)" ] && [ ! -f $(GPU_FAISS) ]; then $(SWAP_FAISS); fi

# on every core (-n auto); worksteal keeps each file's tests together at first (module fixtures built once)
# and moves queued tests to an idle worker at the end
test: venv
	$(PY) -m pytest -q -n auto --dist worksteal

# The main job: a short real training run on Flowers-102 that ends in the evaluation table.
# ARGS: overrides for train.py, e.g. make main ARGS=seed=1
main: venv
	@root=$$($(FIND_DATA)); \
	if [ -z "$$root" ]; then \
	  echo "Flowers-102 not found in $(or $(DATA_ROOT),../shared/data ./data ./datasets): downloading it into $(DOWNLOAD_ROOT)"; \
	  $(PY) scripts/prepare_flowers102.py --data-root $(DOWNLOAD_ROOT) || exit 2; root=$(DOWNLOAD_ROOT); \
	fi; \
	$(PY) train.py --config configs/main.yaml --data-root "$$root" $(ARGS)

baselines: venv
	@root=$$($(FIND_DATA)); $(PY) scripts/evaluate.py --data-root "$${root:-$(DOWNLOAD_ROOT)}" --benchmark flowers102 \
		--together --method gem --method gap --method scda --method scda_plus --method scda_flip_plus \
		--backbone tf_efficientnet_lite0 --out runs/baselines/results.json

# The ablation of docs/training.md (memory, frozen blocks, descriptor scales, head, miner, training resolution at
# the main job's budget; about 10 min a row, ~2 h 10 min on 2 cores).
ablation: venv
	@root=$$($(FIND_DATA)); $(PY) scripts/ablation.py --data-root "$${root:-$(DOWNLOAD_ROOT)}"

bench: venv
	$(PY) scripts/bench_metrics.py

clean:
	rm -rf $(VENV) .pytest_cache
