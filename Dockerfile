# resnet-service: CPU-only image, non-root, weights mounted (or fetched at build time).
#   docker build -t resnet-service .
#   docker run -p 8000:8000 --cpus 2 -v $HOME/.cache/torch/hub/checkpoints:/models/torch/hub/checkpoints:ro resnet-service
# Build with --build-arg FETCH_WEIGHTS=true to download (hash-checked) and pre-quantize at build time.
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# The CPU wheels of the pinned versions (PyPI's are the multi-GB CUDA builds).
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.14.1 torchvision==0.29.1
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install .

FROM python:3.11-slim
RUN useradd --create-home --uid 10001 app && mkdir -p /models && chown app /models
COPY --from=build /opt/venv /opt/venv
# Torch threads default to the container's CPU limit (cgroup quota) divided by the workers.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    TORCH_HOME=/models/torch \
    RESNET_SERVICE_MODEL_CACHE_DIR=/models/cache \
    RESNET_SERVICE_HOST=0.0.0.0 \
    RESNET_SERVICE_PORT=8000
USER app
ARG FETCH_WEIGHTS=false
RUN if [ "$FETCH_WEIGHTS" = "true" ]; then resnet-service quantize; fi
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=90s --retries=3 \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"
STOPSIGNAL SIGTERM
CMD ["resnet-service", "serve"]
