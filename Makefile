# One entry point per check; CI (.ci/run) calls the same targets.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# make run: these override the service's own settings when given (make run PORT=9000 GRPC_PORT=9001
# WORKERS=2); left empty, RESNET_SERVICE_HOST/PORT/GRPC_PORT/WORKERS and then the defaults apply
# (127.0.0.1, 8000, 8001, one worker per usable CPU). HOST counts only on the command line: some
# shells (zsh) export HOST as the machine's name.
PORT ?=
GRPC_PORT ?=
WORKERS ?=
RUN_HOST := $(if $(filter command line,$(origin HOST)),$(HOST))
RUN_FLAGS := $(if $(RUN_HOST),--host $(RUN_HOST)) $(if $(PORT),--port $(PORT)) \
	$(if $(GRPC_PORT),--grpc-port $(GRPC_PORT)) $(if $(WORKERS),--workers $(WORKERS))

.PHONY: install test-deps run test test-fast lint lint-deploy format typecheck openapi bench bench-quick bench-peers bench-http bench-tracing bench-outputs bench-tag bench-fair bench-on-demand finetune-suite robustness check clean

install: $(BIN)/resnet-service

$(BIN)/resnet-service: pyproject.toml bench/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[full,train,dev]" -e ./bench
	@touch $@

# Debian packages the tests drive for real (Chromium, nginx, haproxy); installed when missing.
test-deps:
	scripts/install_test_deps.sh

run: install
	$(BIN)/resnet-service serve $(RUN_FLAGS)

test: install test-deps
	$(BIN)/pytest

test-fast: install
	$(BIN)/pytest -m "not slow and not browser"

lint: install
	$(BIN)/ruff check src bench/resnet_bench tests scripts tools
	$(BIN)/ruff format --check src bench/resnet_bench tests scripts tools

format: install
	$(BIN)/ruff check --fix src bench/resnet_bench tests scripts tools
	$(BIN)/ruff format src bench/resnet_bench tests scripts tools

# The Kubernetes manifests, KServe and the Dockerfile, offline (kubectl kustomize, schemas, hadolint).
lint-deploy: install
	$(BIN)/python -m tools.deploy_lint

typecheck: install
	$(BIN)/mypy

openapi: install
	$(BIN)/resnet-service openapi > openapi/openapi.json

bench: install
	$(BIN)/resnet-service bench --out bench
	$(BIN)/python scripts/update_docs.py bench

bench-quick: install
	$(BIN)/resnet-service bench --quick --out bench/results

# The service against TorchServe (stock image_classifier handler, tuned to this machine), same
# weights, same load, one run; writes bench/peers.json. TorchServe gets its own venv under
# bench/results/peers/ (made once, ~2 min; reused after).
bench-peers: install
	$(BIN)/python -m resnet_bench.peers --out bench

# httptools + uvloop against h11 + asyncio, the service at 16 clients, interleaved rounds
# (~3 min); writes bench/httpstack.json.
bench-http: install
	$(BIN)/python -m resnet_bench.httpstack --out bench

# Tracing off, on (every request, exported to a local OTLP receiver) and off again at 16 clients,
# interleaved rounds (~3 min); writes bench/tracing.json.
bench-tracing: install
	$(BIN)/python -m resnet_bench.tracing --out bench

# What the embedding and map outputs cost /classify, /embed and /explain against it (~5 min).
bench-outputs: install
	$(BIN)/python -m resnet_bench.outputs --out bench --rounds 4

# Priorities and overload against issue 30's goals on 1 and 2 workers: an interactive open
# loop at 30% of capacity alone and beside 32 bulk clients (marked u=7, then unmarked), and a
# 10x open-loop flood (~3 min); writes bench/fairness.json.
bench-fair: install
	$(BIN)/python -m resnet_bench.fairness --out bench

# Models on demand (a cold model's first answer), a 90/10 split over 2,000 requests and a
# shadow version's cost, against issue 33's goals (~4 min); writes bench/on-demand.json.
bench-on-demand: install
	$(BIN)/python -m resnet_bench.on_demand --out bench

# The tag job against this machine's limit for it (decode + batch-8 forward, measured in the
# same run) and against a /classify/batch loop; peak RSS over 10k and 100k inputs (~20 min;
# TAG_MEMORY_SIZES= skips that part). Writes bench/tagjob.json. Speed does not depend on the
# weights, so a machine without them measures with seeded random ones.
TAG_MEMORY_SIZES ?= 10000,100000
bench-tag: install
	$(BIN)/resnet-service quantize --runtime openvino --allow-random-weights \
		--out bench/results/tag-model > /dev/null
	$(BIN)/python -m resnet_bench.tagjob --artifact bench/results/tag-model --out bench \
		--memory-sizes "$(TAG_MEMORY_SIZES)"

# The fine-tuning task suite and the untuned tasks over three seeds, torch int8 at every ISA
# level too (~30 min on 2 cores); prints the tables docs/finetuning.md gives
# (bench/finetune-suite.jsonl keeps the rows).
finetune-suite: install test-deps
	rm -f bench/finetune-suite.jsonl
	RESNET_SUITE_SEEDS=0,1,2 RESNET_SUITE_TASKS=all RESNET_SUITE_ISA_RUNTIMES=openvino,torch \
	RESNET_SUITE_REPORT=bench/finetune-suite.jsonl \
	$(BIN)/pytest -s tests/process/test_training_quality.py; status=$$?; \
	$(BIN)/python scripts/task_table.py bench/finetune-suite.jsonl; exit $$status

# Overload, soak, kill -9, SIGTERM and fuzzing at full size (~30 min); writes bench/robustness.json.
robustness: install
	$(BIN)/python -m resnet_bench.robustness --out bench; status=$$?; \
	$(BIN)/python scripts/update_docs.py robustness; exit $$status

check: lint typecheck test

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build dist src/*.egg-info
