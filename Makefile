# fvlm: `make help` lists the targets. `make demo` and `make test` build the environment themselves.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

DATA ?= data/phantom
MANIFEST ?= $(DATA)/manifest.csv
CACHE ?= data/cache/phantom
N_STUDIES ?= 96
WORKERS ?= 2

.DEFAULT_GOAL := help
.PHONY: help venv test test-slow lint format phantom preprocess demo bench eval-ctrate clean

help: ## List the targets
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "Installing fvlm and its dependencies into $(VENV) (first time: a few minutes)..."
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	$(BIN)/pip check
	@rm -f $(VENV)/.installed-* && touch $@

venv: $(STAMP) ## Create/refresh the virtual environment in .venv

lint: $(STAMP) ## ruff lint + format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP) ## Apply ruff fixes and formatting
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: $(STAMP) lint ## Install, lint and run the fast test suite
	$(BIN)/python -m pytest -q

test-slow: $(STAMP) ## Run the slow end-to-end tests too
	$(BIN)/python -m pytest -q -m "slow or not slow"

phantom: $(STAMP) ## Generate the synthetic CT phantom in $(DATA)
	$(BIN)/fvlm phantom --out $(DATA) --n-studies $(N_STUDIES) --seed 0

demo: phantom ## Install, make phantom data, (later: preprocess, train, evaluate)
	@echo "Phantom written to $(DATA). Next steps (preprocess/train/evaluate) are added as they land."

clean: ## Remove generated data, logs and the virtual environment
	rm -rf data runs lightning_logs $(VENV)
