# prerouter — the table of contents. `make all` runs the pipeline on the demo data; `make test` tests it.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PRE := $(VENV)/bin/prerouter
DEMO := data/raw/demo
DATA ?= $(DEMO)/demo_wide.csv
# The dataset name, as `prerouter ingest` gives it: the file name without its compression and type suffixes
# (battles.jsonl.gz → battles); a folder's or hub dataset's name as it is (arena.v2/ → arena.v2); the first's
# when DATA names several.
DATA_FILE = $(patsubst %.gz,%,$(patsubst %.bz2,%,$(patsubst %.xz,%,$(notdir $(patsubst %/,%,$(firstword $(DATA)))))))
DATA_TYPES := .csv .tsv .jsonl .ndjson .json .parquet .arrow
NAME ?= $(if $(filter $(DATA_TYPES),$(suffix $(DATA_FILE))),$(basename $(DATA_FILE)),$(DATA_FILE))
TRIALS ?= 0
BUDGET_MS ?= 1.0
SHARED ?= ../shared/data
CONFIG ?=
CFG := $(if $(CONFIG),--config $(CONFIG))
# How ingest reads DATA, e.g. INGEST_ARGS="--rename question=prompt,model_name=model,label=score --layout long".
INGEST_ARGS ?=

.PHONY: setup all demo-data ingest label train evaluate export latency tune report test \
        lock bench-quality bench-curve bench-templates bench-latency bench-tune bench-scale bench-scale-gpu mlflow-ui clean bench-serve serve node-conformance retrain

setup: $(VENV)/.installed  ## create .venv and install the project with every extra, at the versions in constraints.txt
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -e '.[train,serve,dev]' -c constraints.txt
	touch $@

# A local build label (torch's +cpu) is dropped so that the pin also matches the same release from PyPI.
lock: setup  ## rewrite constraints.txt from .venv (after upgrading a dependency and passing make test)
	{ grep '^#' constraints.txt; $(VENV)/bin/pip freeze --exclude-editable | grep -v '^#' \
		| sed -E 's/\+[A-Za-z0-9.]+$$//' | LC_ALL=C sort -f; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

$(DEMO)/demo_wide.csv: | setup
	$(PRE) demo-data --out $(DEMO)

all: setup $(if $(filter $(DEMO)/%,$(DATA)),$(DEMO)/demo_wide.csv)  ## the whole pipeline (DATA=file, folder or hf:org/name, CONFIG=yaml)
	$(PRE) run $(DATA) --name $(NAME) $(CFG) --trials $(TRIALS) --budget-ms $(BUDGET_MS) $(INGEST_ARGS)

demo-data: setup  ## write the synthetic demo set in all three layouts
	$(PRE) demo-data --out $(DEMO)

ingest: setup
	$(PRE) ingest $(DATA) --name $(NAME) $(INGEST_ARGS)
label: setup
	$(PRE) label $(NAME) $(CFG)
train: setup
	$(PRE) train $(NAME) $(CFG)
evaluate: setup
	$(PRE) evaluate $(NAME)
export: setup
	$(PRE) export $(NAME) $(CFG)
latency: setup
	$(PRE) check-latency models/$(NAME)/bundle --budget-ms $(BUDGET_MS)
tune: setup
	$(PRE) tune $(NAME) $(CFG) --trials $(or $(filter-out 0,$(TRIALS)),20)
report: setup
	$(PRE) report models/$(NAME)/bundle --data $(NAME)

test: setup  ## the unit suite (no real data needed; real-data tests skip without ../shared/data)
	$(VENV)/bin/pytest -q

bench-quality: setup  ## train on each real file (static: 5 seeds), write bench/results/quality.md and the README's quality tables
	$(VENV)/bin/python bench/quality.py --shared $(SHARED) --students static --seeds 5
	$(VENV)/bin/python bench/quality.py --shared $(SHARED) --students transformer
bench-curve: setup  ## learning curves on MMLU and RouterDC (nested shares of train), RouterDC by task, into bench/results/curve.md
	$(VENV)/bin/python bench/curve.py --shared $(SHARED)
bench-templates: setup  ## few-shot prompts built from MMLU, with and without learned templates
	$(VENV)/bin/python bench/templates.py --shared $(SHARED)
bench-latency: setup  ## teacher and students, fp32 and int8, into bench/results/latency.md
	$(VENV)/bin/python bench/latency.py --shared $(SHARED)
bench-tune: setup  ## 20+ pruned trials on MMLU, into bench/results/tune.md
	$(VENV)/bin/python bench/tune.py --shared $(SHARED)
bench-scale: setup  ## the pipeline at 10k, 30k, 100k prompts over 20 models on cpu, then 1M battles through ingest + label
	$(VENV)/bin/python bench/scale.py --sizes 10000,30000,100000 --models 20 --device cpu
	$(VENV)/bin/python bench/scale.py --ingest-only
bench-scale-gpu: setup  ## the same pipeline sizes on one GPU (teacher and training on cuda), its own section of scale.md
	$(VENV)/bin/python bench/scale.py --sizes 10000,30000,100000 --models 20 --device cuda
bench-serve: setup  ## POST /route at 1, 8, 64 clients, 1 and 2 workers (BUNDLE=, SECONDS=60), into bench/results/serve.md
	$(VENV)/bin/python bench/serve.py --bundle $(BUNDLE) --seconds $(SECONDS)

BUNDLE ?= models/$(NAME)/bundle
PORT ?= 8000
SECONDS ?= 60
serve: setup  ## prerouter serve BUNDLE on 127.0.0.1:PORT (UPSTREAMS=file for the OpenAI-compatible proxy)
	$(PRE) serve $(BUNDLE) --port $(PORT) $(if $(UPSTREAMS),--upstreams $(UPSTREAMS))
node-conformance: $(BUNDLE)/conformance.jsonl  ## the Node.js client (examples/node) against a bundle's conformance vectors
	cd examples/node && ONNXRUNTIME_NODE_INSTALL_CUDA=skip npm install --no-audit --no-fund --silent
	node examples/node/conformance.mjs $(BUNDLE)

# Retrain in CI: DATA= new file(s), CHAMPION= a bundle folder or models:/prerouter-NAME@ALIAS. Trains a
# challenger, gates it (parity in export, latency), compares it with the champion on EVAL_DATA (default:
# the new data's test split; EVAL_ARGS="--rename ... --models ..." reads an EVAL_DATA file) and promotes it;
# any failing step (a lost comparison, a gate) exits non-zero.
CHAMPION ?= models:/prerouter-$(NAME)@champion
EVAL_DATA ?= $(NAME)
MARGIN ?= 0.01
MODELS ?= $(or $(PREROUTER_MODELS_DIR),models)
retrain: setup  ## DATA=file(s) CHAMPION=alias-or-path: pipeline, compare, promote the challenger if it is not worse
	$(if $(and $(word 2,$(DATA)),$(filter file,$(origin NAME))),$(error several DATA files: name the dataset with NAME=))
	$(PRE) ingest $(DATA) --name $(NAME) $(INGEST_ARGS)
	$(PRE) label $(NAME) $(CFG)
	$(PRE) train $(NAME) $(CFG)
	$(PRE) export $(NAME) $(CFG) --out $(MODELS)/$(NAME)/bundle
	$(PRE) check-latency $(MODELS)/$(NAME)/bundle --budget-ms $(BUDGET_MS)
	$(PRE) compare $(CHAMPION) $(MODELS)/$(NAME)/bundle --data $(EVAL_DATA) --margin $(MARGIN) \
		--out $(MODELS)/$(NAME)/compare $(if $(filter models:/%,$(CHAMPION)),--allow-missing-champion) $(EVAL_ARGS)
	$(PRE) promote $(NAME) $(MODELS)/$(NAME)/bundle

# The store setup_mlflow logs to (unless MLFLOW_TRACKING_URI names a server): SQLite + artifact folder.
MLRUNS ?= $(or $(PREROUTER_MLRUNS_DIR),mlruns)
MLFLOW_HOST ?= 127.0.0.1
MLFLOW_PORT ?= 5000
MLFLOW_WORKERS ?= 1
mlflow-ui: setup  ## browse the runs in mlruns/mlflow.db (MLRUNS=dir, MLFLOW_PORT=5000) at http://127.0.0.1:5000
	mkdir -p $(MLRUNS)
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(abspath $(MLRUNS))/mlflow.db \
		--default-artifact-root file://$(abspath $(MLRUNS))/artifacts \
		--host $(MLFLOW_HOST) --port $(MLFLOW_PORT) --workers $(MLFLOW_WORKERS)

clean:  ## remove generated data, models and runs (keeps .venv)
	rm -rf data/raw data/processed models/*/ mlruns/*/ mlruns/*.log bench/out
