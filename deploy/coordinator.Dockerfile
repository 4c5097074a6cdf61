# syntax=docker/dockerfile:1
# umeml coordinator: `umeml-server start` (Flower SuperLink + the umeml ServerApp).
# Build from the repository root (the build context must hold pyproject.toml):
#   docker build -f deploy/coordinator.Dockerfile -t umeml-coordinator:0.1.0 .
# or `docker compose -f deploy/compose.yaml build`. See docs/deployment.md.
ARG PYTHON_VERSION=3.11
FROM python:${PYTHON_VERSION}-slim-bookworm

# The umeml version this image must contain (default: the version in pyproject.toml). The build
# fails when the repository copied into the context is another version: coordinator and sites
# must run the same umeml version (the handshake refuses a mismatch).
ARG UMEML_VERSION=0.1.0
# The coordinator never trains; CPU wheels of torch are enough (and ~10x smaller than CUDA ones).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# e.g. --build-arg TORCH_PACKAGES="torch==2.5.1" to pin torch as well
ARG TORCH_PACKAGES=torch
# Optional pip constraints file, relative to the repository root (e.g. deploy/constraints.txt made
# with `pip freeze` in a tested environment): build every image of a federation with the same one,
# so that coordinator and sites also run the same flwr, torch and opacus versions.
ARG UMEML_CONSTRAINTS=
# The unprivileged user the coordinator runs as. Build with your own ids
# (--build-arg UMEML_UID=$(id -u) --build-arg UMEML_GID=$(id -g)) so that the 0600 key files
# written by deploy/make-pki.sh are readable inside the container without loosening them.
ARG UMEML_UID=10001
ARG UMEML_GID=10001

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 \
    FLWR_TELEMETRY_ENABLED=0 \
    FLWR_DISABLE_UPDATE_CHECK=1 \
    HOME=/var/lib/umeml

COPY . /src
RUN python -m pip install ${UMEML_CONSTRAINTS:+--constraint "/src/${UMEML_CONSTRAINTS}"} --index-url "${TORCH_INDEX_URL}" ${TORCH_PACKAGES} \
 && python -m pip install ${UMEML_CONSTRAINTS:+--constraint "/src/${UMEML_CONSTRAINTS}"} /src \
 && python -c "import sys, umeml; v = umeml.__version__; sys.exit(0 if v == '${UMEML_VERSION}' else f'umeml {v} in the build context, but UMEML_VERSION=${UMEML_VERSION}')" \
 && rm -rf /src

RUN groupadd --system --gid "${UMEML_GID}" umeml \
 && useradd --system --uid "${UMEML_UID}" --gid "${UMEML_GID}" --home-dir /var/lib/umeml --shell /usr/sbin/nologin umeml \
 && mkdir -p /var/lib/umeml/runs /etc/umeml/tls /etc/umeml/site-keys \
 && chown -R "${UMEML_UID}:${UMEML_GID}" /var/lib/umeml

USER ${UMEML_UID}:${UMEML_GID}
WORKDIR /var/lib/umeml
# The run directories (checkpoints, metrics, resume.pt): mount a volume here and back it up.
VOLUME ["/var/lib/umeml/runs"]
# Flower's SuperLink: Fleet, Control and Runtime API on this one port (HTTPS). Publish it only to
# the reverse proxy's network, never to the sites or the internet (docs/security.md section 4).
EXPOSE 9092

ENTRYPOINT ["umeml-server"]
CMD ["start", "--config", "/etc/umeml/experiment.yaml", "--sites", "3", "--out", "/var/lib/umeml/runs/federation", "--host", "0.0.0.0", "--port", "9092", "--tls-dir", "/etc/umeml/tls", "--site-keys", "/etc/umeml/site-keys"]
