# resnet-service: CPU-only images, non-root, read-only-root friendly. Two final targets:
#
#   slim (the default target): the OpenVINO int8 model built at image build time, served as is
#     (RESNET_SERVICE_ARTIFACT_PATH). No torch in the image: small, fast start, nothing to build.
#       docker build --target slim -t resnet-service:slim .
#   full: torch + OpenVINO + ONNX Runtime and the fp32 weights; the torch and OpenVINO int8
#     models are pre-built in /models/cache, any other runtime/precision is built at start
#     (then the cache must be writable).
#       docker build --target full -t resnet-service:full .
#
# The model is built in the `build` stage, so the weights must reach it, one of:
#   * put resnet18-f37072fd.pth into deploy/weights/ (the build context; see its README), or
#   * --build-arg FETCH_WEIGHTS=true: download them (sha256-checked) during the build, or
#   * --build-arg ALLOW_RANDOM_WEIGHTS=true: DEVELOPMENT ONLY, seeded random weights (every
#     prediction then says random_weights=true).
# Without any of them the build stops with a message that says how to provide the weights.
#
# Run (either target): the process writes only under TMPDIR (and a writable model cache), so
#   docker run --read-only --tmpfs /tmp -p 8000:8000 -p 8001:8001 --cpus 2 resnet-service:slim
# Kubernetes manifests: deploy/ (guide: docs/deploy.md).

ARG PYTHON_IMAGE=python:3.11-slim

# --- common base: Python, no pip cache, no bytecode writes at run time --------------------
FROM ${PYTHON_IMAGE} AS base
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
WORKDIR /src

# --- build: torch (CPU wheels) and every runtime; builds the models -----------------------
FROM base AS build
# The CPU wheels of the pinned versions (PyPI's are the multi-GB CUDA builds).
RUN python -m venv /opt/venv \
 && pip install --index-url https://download.pytorch.org/whl/cpu torch==2.14.1 torchvision==0.29.1
COPY pyproject.toml README.md ./
COPY src ./src
# torch/torchvision are already satisfied by the CPU wheels above (2.14.1+cpu matches ==2.14.1).
RUN pip install "./[full]"
# deploy/weights/ holds only a README unless weights were put there; torch hub's cache layout.
ENV TORCH_HOME=/models/torch
COPY deploy/weights/ /models/torch/hub/checkpoints/
ARG FETCH_WEIGHTS=false
ARG ALLOW_RANDOM_WEIGHTS=false
# The OpenVINO int8 model for `slim` (copied out with --out) and the torch int8 one for `full`,
# both cached in /models/cache, calibrated on the built-in images.
RUN RESNET_SERVICE_ALLOW_DOWNLOADS="${FETCH_WEIGHTS}" \
    RESNET_SERVICE_ALLOW_RANDOM_WEIGHTS="${ALLOW_RANDOM_WEIGHTS}" \
    resnet-service quantize --runtime openvino --cache-dir /models/cache --out /models/openvino-int8 \
 && RESNET_SERVICE_ALLOW_DOWNLOADS="${FETCH_WEIGHTS}" \
    RESNET_SERVICE_ALLOW_RANDOM_WEIGHTS="${ALLOW_RANDOM_WEIGHTS}" \
    resnet-service quantize --runtime torch --cache-dir /models/cache

# --- the slim image's environment: the base install + OpenVINO, nothing else --------------
FROM base AS slim-venv
RUN python -m venv /opt/venv
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install "./[openvino]"

# --- full: torch included; can build other runtimes at start ------------------------------
FROM base AS full
RUN groupadd --system --gid 10001 app \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
    --shell /usr/sbin/nologin app
COPY --from=build /opt/venv /opt/venv
COPY --from=build /models /models
# RESNET_SERVICE_HOST: the default (127.0.0.1) is unreachable from outside a container;
# LOG_FORMAT json: one JSON object a line for the cluster's log pipeline.
ENV HOME=/tmp \
    TMPDIR=/tmp \
    TORCH_HOME=/models/torch \
    RESNET_SERVICE_MODEL_CACHE_DIR=/models/cache \
    RESNET_SERVICE_HOST=0.0.0.0 \
    RESNET_SERVICE_PORT=8000 \
    RESNET_SERVICE_LOG_FORMAT=json
# An empty, root-owned working directory: `python -m` puts it first on sys.path, so it must
# not be a writable place such as /tmp.
WORKDIR /app
USER 10001:10001
# HTTP (JSON API, OIP v2 REST, probes, metrics) and gRPC (OIP v2, grpc.health.v1).
EXPOSE 8000 8001
# Long start period: a runtime/precision not in the cache is built at start.
HEALTHCHECK --interval=10s --timeout=3s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('RESNET_SERVICE_PORT', '8000'), timeout=2)"]
# The supervisor is PID 1 (exec form): it forwards SIGTERM to its workers, which drain.
STOPSIGNAL SIGTERM
CMD ["resnet-service", "serve"]

# --- slim (default target): OpenVINO int8 artifact, no torch ------------------------------
FROM base AS slim
RUN groupadd --system --gid 10001 app \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
    --shell /usr/sbin/nologin app
COPY --from=slim-venv /opt/venv /opt/venv
COPY --from=build /models/openvino-int8 /models/openvino-int8
# RUNTIME/PRECISION name what the artifact is: serve hands every setting to its workers, and a
# runtime left at its default (torch) there conflicts with an OpenVINO artifact (exit 3).
ENV HOME=/tmp \
    TMPDIR=/tmp \
    RESNET_SERVICE_ARTIFACT_PATH=/models/openvino-int8 \
    RESNET_SERVICE_RUNTIME=openvino \
    RESNET_SERVICE_PRECISION=int8 \
    RESNET_SERVICE_HOST=0.0.0.0 \
    RESNET_SERVICE_PORT=8000 \
    RESNET_SERVICE_LOG_FORMAT=json
WORKDIR /app
USER 10001:10001
EXPOSE 8000 8001
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('RESNET_SERVICE_PORT', '8000'), timeout=2)"]
STOPSIGNAL SIGTERM
CMD ["resnet-service", "serve"]
