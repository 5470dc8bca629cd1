# OEL's images, the one source of truth for what runs in Kubernetes (k8s/base/kustomization.yaml: images
# "oel" and "oel-cuda").
#
#   target cpu  (default): processor, agents, `oel models ...`; torch's CPU build.
#   target cuda:           the learner (OPCD on its GPU, OEL_MODEL__DEVICE=auto picks it) and GPU agents
#                          with OEL_MODEL__BACKEND=transformers; torch's CUDA build from PyPI, which brings
#                          its CUDA runtime as nvidia-* wheels: the node needs only the NVIDIA driver and
#                          device plugin, so both targets share the same Debian base.
#
# Every Python package is pinned by constraints.txt (the same file the tests install from). torch's CPU
# build is not on PyPI: put its wheel (torch-2.13.0+cpu-cp311-...whl) in docker/wheels/, or pass
# --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu. infra/image/build.sh does the former
# and builds both targets with buildah or docker.
#
#   docker build -t oel:0.1.0 .                       # or: bash infra/image/build.sh
#   docker build --target cuda -t oel:0.1.0-cuda .
#
# Both run as the non-root user oel (uid 10001, gid 10001) with HOME=/var/lib/oel; the root file system can
# be read-only (k8s mounts emptyDirs at /var/lib/oel and /tmp).

ARG BASE_IMAGE=debian:bookworm-slim

# --- base: Debian 12's Python 3.11 (the version the project pins), no compiler ------------------------
FROM ${BASE_IMAGE} AS base
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3=3.11.* python3-venv=3.11.* ca-certificates libgomp1 tini \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 oel \
 && useradd --system --uid 10001 --gid oel --home-dir /var/lib/oel --create-home --shell /usr/sbin/nologin oel

# --- build: a virtualenv in /opt/oel with OEL and its pinned dependencies, one per torch variant ---------
FROM base AS build-cpu
ARG TORCH_INDEX_URL=
ARG WITH_DEFAULT_MODEL=1
ENV PATH=/opt/oel/bin:$PATH
WORKDIR /src
RUN python3 -m venv /opt/oel
COPY constraints.txt pyproject.toml README.md ./
COPY docker/install-python.sh ./docker/
COPY docker/wheels/ /tmp/wheels/
RUN --mount=type=secret,id=pip_ca sh docker/install-python.sh torch cpu
COPY oel ./oel
COPY producers ./producers
COPY processors ./processors
COPY learner ./learner
COPY gateway ./gateway
COPY evaluation ./evaluation
COPY recipes ./recipes
COPY reference ./reference
RUN --mount=type=secret,id=pip_ca sh docker/install-python.sh app cpu

FROM base AS build-cuda
ARG WITH_DEFAULT_MODEL=1
ENV PATH=/opt/oel/bin:$PATH
WORKDIR /src
RUN python3 -m venv /opt/oel
COPY constraints.txt pyproject.toml README.md ./
COPY docker/install-python.sh ./docker/
RUN --mount=type=secret,id=pip_ca mkdir -p /tmp/wheels && sh docker/install-python.sh torch cuda
COPY oel ./oel
COPY producers ./producers
COPY processors ./processors
COPY learner ./learner
COPY gateway ./gateway
COPY evaluation ./evaluation
COPY recipes ./recipes
COPY reference ./reference
RUN --mount=type=secret,id=pip_ca sh docker/install-python.sh app cuda

# --- runtime images ----------------------------------------------------------------------------------
FROM base AS runtime
ENV PATH=/opt/oel/bin:$PATH \
    HOME=/var/lib/oel \
    HF_HUB_OFFLINE=1 \
    OEL_PATHS__STATE_DIR=/var/lib/oel/state \
    OEL_PATHS__CACHE_DIR=/var/lib/oel/cache
USER 10001:10001
WORKDIR /var/lib/oel
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["oel", "--help"]

FROM runtime AS cuda
COPY --from=build-cuda /opt/oel /opt/oel
LABEL org.opencontainers.image.title="oel-cuda" \
      org.opencontainers.image.description="OEL with torch's CUDA build (learner, GPU agents)"

FROM runtime AS cpu
COPY --from=build-cpu /opt/oel /opt/oel
LABEL org.opencontainers.image.title="oel" \
      org.opencontainers.image.description="OEL with torch's CPU build (processor, agents, CLI)"
