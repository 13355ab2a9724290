# syntax=docker/dockerfile:1
#
# mtp-serve: HTTP inference service for the multi-token-prediction transformer.
#
# Two stages: `builder` makes a virtualenv at /opt/venv holding torch and the `app`
# package; `runtime` is python:3.11-slim with g++ (Inductor builds the compiled decode
# steps' CPU kernels with it at start-up, MTP_COMPILE), that venv and the default
# checkpoint (no pip cache, no source tree).
#
# CPU (default) and CUDA images differ only in which torch wheel goes into the venv:
#
#   docker build -t mtp-serve:cpu .
#   docker build -t mtp-serve:cuda --build-arg TORCH_VARIANT=cu128 .
#
# TORCH_VARIANT names a PyTorch wheel index (cpu, cu126, cu128, ...; pick one that
# lists torch==2.13.0). CUDA wheels carry the CUDA runtime libraries as pip
# dependencies, so the same slim base serves both: the host needs only the NVIDIA
# driver and the NVIDIA container toolkit (`docker run --gpus all ...`).
#
# NOTE: both variants download torch from download.pytorch.org at build time, so the
# build needs network access to it (the CUDA one pulls several GB). A plain PyPI torch
# on linux/x86_64 is the CUDA build, which is why even the CPU image names the CPU
# index: it keeps the CPU image a few hundred MB instead of several GB. Point
# TORCH_INDEX_URL at a mirror where download.pytorch.org is not reachable.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder

ARG TORCH_VARIANT=cpu
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/${TORCH_VARIANT}
ARG TORCH_VERSION=2.13.0

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# torch first, in its own layer: it is by far the largest dependency and changes
# far less often than the application code.
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

WORKDIR /src
# README.md is the package's `readme` in pyproject.toml, so the build needs it.
COPY pyproject.toml README.md ./
COPY app ./app
# torch==2.13.0 (e.g. 2.13.0+cpu) is already satisfied; the rest comes from PyPI.
RUN pip install --no-cache-dir . \
    && python -c "import torch, app; print('torch', torch.__version__)"


FROM ${PYTHON_IMAGE} AS runtime

LABEL org.opencontainers.image.title="mtp-serve" \
      org.opencontainers.image.description="HTTP inference service for a multi-token-prediction transformer"

# A named user for uid 10001, so that getpass.getuser() (used by torch's compile
# caches) resolves; its home is /tmp, the only writable path under a read-only root.
RUN groupadd --gid 10001 mtp \
    && useradd --uid 10001 --gid 10001 --no-log-init --no-create-home \
       --home-dir /tmp --shell /usr/sbin/nologin mtp

# The compiled decode steps (MTP_COMPILE=true, the default) need a C++ compiler at run
# time on CPU; without one the service logs the failure and serves eager steps.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /var/cache/mtp \
    && chown 10001:10001 /var/cache/mtp

COPY --from=builder /opt/venv /opt/venv

# The default checkpoint is baked in; set MTP_CHECKPOINT to a mounted directory
# (config.json, model.safetensors, tokenizer.json) to serve another one.
WORKDIR /app
COPY models/default /app/models/default

# Caches that torch, matplotlib and friends write go to /tmp, so the container runs
# with a read-only root filesystem plus a writable /tmp (tmpfs / emptyDir). The compiled
# decode steps and Inductor's autotuning results go to /var/cache/mtp: mount a volume
# there and later starts read them instead of compiling again (minutes on 2 cores).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    MPLCONFIGDIR=/tmp/matplotlib \
    MTP_CHECKPOINT=/app/models/default \
    MTP_COMPILE_CACHE_DIR=/var/cache/mtp \
    MTP_HOST=0.0.0.0 \
    MTP_PORT=8000 \
    MTP_DEVICE=auto \
    MTP_LOG_JSON=true

USER 10001:10001
EXPOSE 8000

# /health is liveness only (the process answers); readiness (/ready) is for load
# balancers and Kubernetes, not for restarting the container while the model loads.
# /health is 503 until the decode steps are compiled: a cold start took 19 minutes on 2 CPU
# cores (README, start-up), a warm one (the cache volume) about 7.
HEALTHCHECK --interval=15s --timeout=5s --start-period=1800s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('MTP_PORT', '8000'), timeout=4)"]

CMD ["mtp", "serve"]
