# Set-up on a fresh machine is two commands: `make serve` and `make test`.
# The model store is BentoML's: $BENTOML_HOME (default ~/bentoml); `bentoml models list` shows it.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 3000
MODEL ?= digits-classifier:latest
DETECTOR ?= digits-detector:latest
PIP_INSTALL := $(BIN)/pip install -qq --disable-pip-version-check -c requirements/constraints.txt
PYTEST_ARGS ?=

.PHONY: help venv dev-venv model train serve detector-model train-detector serve-detector serve-models test test-fast lint build container container-gpu container-smoke bench peer-venvs bench-gpu bench-models bench-overhead bench-request-path bench-precision soak drift-report clean

help:
	@echo "make serve   create $(VENV), train+export the default model if the store has none, serve on $(HOST):$(PORT)"
	@echo "make serve-detector  the same for the object detector (service:ObjectDetector)"
	@echo "make serve-models    several models in one deployment (service:ModelServer, configuration.yaml)"
	@echo "make test    create $(VENV) if needed and run the whole test suite"
	@echo "make test-fast  the unit tests only: no model trained, no server (under a minute)"
	@echo "make lint    ruff over the repository, mypy (strict on serving/)"
	@echo "make train   train and export a new version of the default model"
	@echo "make train-detector  train and export a new version of the default detector"
	@echo "make build   bentoml build (the bento carries the model)"
	@echo "make container        bentoml build + containerize -> image-classifier and object-detector images (CPU, about 400 MB each)"
	@echo "make container-gpu    the same with onnxruntime-gpu and the CUDA libraries -> image-classifier-gpu"
	@echo "make container-smoke  build both CPU images, docker run, check them as a user would (size, uid, a killed worker), clean up"
	@echo "make bench   runtime ceilings + servers under wrk load, classifiers and the detector -> docs/benchmarks.md (about 25 min)"
	@echo "make bench-overhead  cost of request log, drift and a shadow to served latency -> docs/overhead.md"
	@echo "make bench-request-path  one request's time inside a worker, part by part, no HTTP -> docs/request-path.md"
	@echo "make bench-models  what each extra model costs a multi-model deployment -> docs/multi-model-cost.md"
	@echo "make bench-precision  fp32/fp16/int8 accuracy and CPU throughput -> docs/precision.md"
	@echo "make drift-report  offline drift investigation -> docs/drift.md + docs/drift.png"
	@echo "make soak    10 min at 80% of measured capacity: errors and RSS -> docs/soak.md"

# Two environments in one venv: what training and serving need (make serve, train, build), and
# on top of it the test and lint tools (make test, test-fast, lint). Each re-installs when its
# requirements change. pip, not uv: see requirements/constraints.txt.
venv: $(BIN)/.installed
dev-venv: $(BIN)/.dev-installed

$(BIN)/.installed: requirements/train.txt requirements/client.txt requirements/serving.txt requirements/constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) -r requirements/train.txt
	touch $@

$(BIN)/.dev-installed: $(BIN)/.installed requirements/dev.txt
	$(PIP_INSTALL) -r requirements/dev.txt
	touch $@

# Trains only when the store has no $(MODEL): idempotent.
model: venv
	@$(BIN)/bentoml models get $(MODEL) >/dev/null 2>&1 \
		|| { echo "No $(MODEL) in the model store; training it (about 30 s)."; $(BIN)/python -m train_export; }

train: venv
	$(BIN)/python -m train_export

serve: model
	$(BIN)/bentoml serve service:ImageClassifier --host $(HOST) --port $(PORT)

# The object detector: the same, for `service:ObjectDetector` and $(DETECTOR).
detector-model: venv
	@$(BIN)/bentoml models get $(DETECTOR) >/dev/null 2>&1 \
		|| { echo "No $(DETECTOR) in the model store; training it (about 3-5 min)."; $(BIN)/python -m train_export --task detection; }

train-detector: venv
	$(BIN)/python -m train_export --task detection

serve-detector: detector-model
	$(BIN)/bentoml serve service:ObjectDetector --host $(HOST) --port $(PORT)

# Several models in one deployment (configuration.yaml's ModelServer block: the digits
# classifier and the detector by default): docs/multi-model.md.
serve-models: model detector-model
	$(BIN)/bentoml serve service:ModelServer --host $(HOST) --port $(PORT)

# The Swagger UI test drives Debian's Chromium (Playwright's own browser download needs internet);
# the monitoring test runs Debian's Prometheus against a real server.
test: dev-venv
	@command -v chromium >/dev/null || { apt-get update -qq && apt-get install -y -qq chromium; }
	@command -v prometheus >/dev/null || { apt-get update -qq && apt-get install -y -qq prometheus; }
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Unit tests only (pytest.ini: everything not marked e2e): no training, no server, no browser.
# One OpenMP thread: the unit tests' tensors are small, and on a busy machine torch's threads
# spin against each other (the TorchDrift comparison in tests/serving/test_drift.py).
test-fast: dev-venv
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -m "not e2e" $(PYTEST_ARGS)

# ruff (style, imports, common bugs) over everything; mypy, strict on serving/ (pyproject.toml).
lint: dev-venv
	$(BIN)/ruff check .
	$(BIN)/mypy

build: model
	$(BIN)/bentoml build

# bentoml build + bentoml containerize (a local Debian base where Docker Hub is out of reach),
# for both services: image-classifier:latest and object-detector:latest, ONNX Runtime's CPU build.
# One of them: `make container CONTAINER_ARGS="--service detector"`. Where no Docker engine
# answers, it starts its own and leaves it running: it prints the DOCKER_HOST to use.
container: model detector-model
	$(BIN)/python deploy/container/container.py build $(CONTAINER_ARGS)

# The classifier's GPU image, image-classifier-gpu:latest (deploy/container/bentofile.gpu.yaml):
# onnxruntime-gpu with the CUDA and cuDNN wheels, several GB; they come from this machine's pip
# mirrors where pip has some. Runs with `docker run --gpus all` (docs/deploy.md#gpu).
container-gpu: model
	$(BIN)/python deploy/container/container.py build --service classifier-gpu $(CONTAINER_ARGS)

# The offline drift investigation: p-values per kernel and stream, and the embeddings figure
# (about 2 min); writes docs/drift.md and docs/drift.png.
drift-report: model
	$(BIN)/python -m train_export.drift_report

# For each service (the classifier, then the detector): build, `docker run --network host`, check
# /readyz, a prediction (/classify, or /detect on a composed scene), the model tag, the image size
# (at most 450 MB), a numeric non-root user, the CPU ONNX Runtime, no compilers, git, torch or
# training code inside, and a worker SIGKILLed under steady requests (back within 15 s, no request
# lost but its own); starts (and stops) its own dockerd if none answers.
container-smoke: model detector-model
	$(BIN)/python deploy/container/container.py smoke $(CONTAINER_ARGS)

$(BIN)/.bench-installed: $(BIN)/.dev-installed requirements/bench.txt
	$(PIP_INSTALL) -r requirements/bench.txt
	touch $@

# wrk is the load generator: C, a few % of a core, so the server gets the machine. The Ray Serve
# and TorchServe peers run from venvs of their own (build/peers/, requirements/peers-*.txt, about
# 1 and 6 GB), which the bench makes when it first needs them; `make peer-venvs` makes them ahead.
bench: $(BIN)/.bench-installed
	@command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk; }
	$(BIN)/python -m bench $(BENCH_ARGS)

peer-venvs: $(BIN)/.bench-installed
	$(BIN)/python -m bench.peers.venvs

# Not in CI: 10 minutes at 80% of measured capacity, with the tests' bad input, multipart fuzz
# and oversized bodies sent beside it (bench/abuse.py, --abuse-rate); writes docs/soak.md.
soak: $(BIN)/.bench-installed
	@command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk; }
	$(BIN)/python -m bench.soak $(SOAK_ARGS)

# One request's time inside a worker's app, without HTTP: the service in six configurations,
# a request that does no work and the FastAPI peer, each in a fresh process, x 3 rounds (about
# 5 min); writes docs/request-path.md.
bench-request-path: $(BIN)/.bench-installed
	$(BIN)/python -m bench.request_path $(BENCH_ARGS)

# What the request log, drift detection and a shadow cost the served answers: alternating
# servers, five configurations x 3 rounds (about 10 min); writes docs/overhead.md.
bench-overhead: $(BIN)/.bench-installed
	@command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk; }
	$(BIN)/python -m bench.overhead $(BENCH_ARGS)

# What each extra model costs service:ModelServer (start time, RSS per worker); about 2 min;
# writes docs/multi-model-cost.md.
bench-models: $(BIN)/.bench-installed model detector-model
	$(BIN)/python -m bench.models $(BENCH_ARGS)

# fp32 / fp16 / int8 of the default model and a resnet18: accuracy and CPU throughput
# (about 6 min, most of it training the resnet18 once); writes docs/precision.md.
bench-precision: $(BIN)/.bench-installed
	$(BIN)/python -m bench.precision $(BENCH_ARGS)

# On a machine with an NVIDIA GPU: resnet50 at 224x224, served vs raw GPU throughput.
bench-gpu: $(BIN)/.bench-installed
	@command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk; }
	$(BIN)/python -m bench --gpu --no-levers --config configuration.gpu.yaml $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
