# The serving image: `sentiment-nb serve` (Ray Serve) on the exported model/ folder, CPU PyTorch by default.
#
#   dvc repro export                      # or `dvc pull`: model/ must exist before the build
#   docker build -t sentiment-nb .
#   docker run --rm -p 8000:8000 --shm-size=1g --stop-timeout 30 sentiment-nb   # a clean stop takes 6-9 s
#
# For a GPU image, take PyTorch from a CUDA index and run with `--gpus all` and serve.num_gpus > 0:
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 -t sentiment-nb:cuda .
ARG PYTHON_VERSION=3.11
FROM python:${PYTHON_VERSION}-slim

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false \
    RAY_AUTH_MODE=disabled \
    RAY_USAGE_STATS_ENABLED=0 \
    RAY_TMPDIR=/tmp/ray

WORKDIR /app

# PyTorch first, from the chosen index, so that pip never pulls a CUDA build into the CPU image.
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

# Only the serving stack: the training tools (dvc, datasets, papermill...) stay out of the image.
RUN pip install "ray[serve]>=2.60" "transformers>=5.2,<6" tokenizers safetensors "onnxruntime>=1.20" numpy pyyaml "pydantic>=2" \
        fastapi fastapi-offline uvicorn httpx

COPY settings.ini setup.py pyproject.toml README.md ./
COPY sentiment_nb/ sentiment_nb/
RUN pip install --no-deps . && useradd --create-home --uid 10001 app

COPY params.yaml serve_config.yaml ./
COPY model/ model/

USER app
# 8000: the API; 8080: Ray's Prometheus metrics (Serve's and the app's counters)
EXPOSE 8000 8080
HEALTHCHECK --interval=30s --timeout=15s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request as u; u.build_opener(u.ProxyHandler({})).open('http://127.0.0.1:8000/healthz', timeout=12)"]
CMD ["sentiment-nb", "serve", "--host", "0.0.0.0", "--port", "8000", "--model", "/app/model", "--params", "/app/params.yaml", \
     "--metrics-port", "8080"]
