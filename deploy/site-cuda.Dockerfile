# syntax=docker/dockerfile:1
# umeml hospital site with an NVIDIA GPU: the same image as deploy/site.Dockerfile, with CUDA
# wheels of torch/torchvision. The wheels bring the CUDA runtime and cuDNN themselves, so the base
# stays a plain Python image; the host needs only the NVIDIA driver and the NVIDIA Container
# Toolkit (`docker run --gpus all`, or `gpus: all` in compose).
# Build from the repository root:
#   docker build -f deploy/site-cuda.Dockerfile -t umeml-site-cuda:0.1.0 .
# See docs/deployment.md (GPU requirements).
ARG PYTHON_VERSION=3.11
FROM python:${PYTHON_VERSION}-slim-bookworm

# The umeml version this image must contain (default: the version in pyproject.toml); the build
# fails for any other version in the context. Sites and coordinator must run the same version.
ARG UMEML_VERSION=0.1.0
# CUDA 12.8 wheels need an NVIDIA driver of branch 570 or later; for an older driver pick the
# matching index (e.g. https://download.pytorch.org/whl/cu126).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
# e.g. --build-arg TORCH_PACKAGES="torch==2.7.1 torchvision==0.22.1" to pin them
ARG TORCH_PACKAGES="torch torchvision"
# Optional pip constraints file, relative to the repository root (e.g. deploy/constraints.txt made
# with `pip freeze` in a tested environment): build every image of a federation with the same one,
# so that coordinator and sites also run the same flwr, torch and opacus versions.
ARG UMEML_CONSTRAINTS=
# The unprivileged user the site runs as; build with --build-arg UMEML_UID=$(id -u) (and GID) so
# that the site's 0600 private key is readable in the container without loosening it.
ARG UMEML_UID=10001
ARG UMEML_GID=10001

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 \
    FLWR_TELEMETRY_ENABLED=0 \
    FLWR_DISABLE_UPDATE_CHECK=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    HOME=/var/lib/umeml

COPY . /src
RUN python -m pip install ${UMEML_CONSTRAINTS:+--constraint "/src/${UMEML_CONSTRAINTS}"} --index-url "${TORCH_INDEX_URL}" ${TORCH_PACKAGES} \
 && python -m pip install ${UMEML_CONSTRAINTS:+--constraint "/src/${UMEML_CONSTRAINTS}"} "/src[extract]" \
 && python -c "import sys, umeml; v = umeml.__version__; sys.exit(0 if v == '${UMEML_VERSION}' else f'umeml {v} in the build context, but UMEML_VERSION=${UMEML_VERSION}')" \
 && python -c "import torch, sys; sys.exit(0 if torch.version.cuda else 'torch without CUDA: check TORCH_INDEX_URL')" \
 && rm -rf /src

RUN groupadd --system --gid "${UMEML_GID}" umeml \
 && useradd --system --uid "${UMEML_UID}" --gid "${UMEML_GID}" --home-dir /var/lib/umeml --shell /usr/sbin/nologin umeml \
 && mkdir -p /var/lib/umeml/state /etc/umeml/tls /data \
 && chown -R "${UMEML_UID}:${UMEML_GID}" /var/lib/umeml

USER ${UMEML_UID}:${UMEML_GID}
WORKDIR /var/lib/umeml
# The site's state: Flower's home and privacy.json (the DP accountant's ledger); back it up.
VOLUME ["/var/lib/umeml/state"]

ENTRYPOINT ["umeml-client"]
CMD ["start", "--site", "/etc/umeml/site.yaml", "--server", "fl.example.org:443", "--root-certificates", "/etc/umeml/tls/ca.crt", "--auth-key", "/etc/umeml/site.key"]
