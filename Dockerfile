# One image for both entrypoints: `moeplace operator` (the default command) and `moeplace agent`
# (the serving pods' agent: `args: ["agent", ...]`).
#
#   docker build -t moeplace .                               # CPU torch
#   docker build -t moeplace:cu124 \
#     --build-arg TORCH_VARIANT=cu124 \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu124 .
#
# The builder stage is run outside Docker by tests/test_dockerfile_install.py: same instructions, same
# requirements/image.txt, in a fresh virtualenv. Keep it to ARG, ENV, WORKDIR, COPY and RUN.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
# torch's version must match pyproject.toml's agent extra (a test checks); the variant picks the
# build (cpu, cu124, ...) and the index must serve that variant.
ARG TORCH_VERSION=2.13.0
ARG TORCH_VARIANT=cpu
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV VIRTUAL_ENV=/opt/moeplace
ENV PATH=$VIRTUAL_ENV/bin:$PATH PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv "$VIRTUAL_ENV"
# Dependencies before the sources, so a code change reuses these layers. The lock is complete
# (`pip check` below proves it), hence --no-deps: what is installed is exactly what is pinned.
COPY requirements/image.txt requirements/image.txt
RUN pip install --no-deps -r requirements/image.txt
# torch's own dependencies are already pinned above; a CUDA variant adds its nvidia-* wheels from
# the same index.
RUN pip install --index-url "$TORCH_INDEX_URL" "torch==${TORCH_VERSION}+${TORCH_VARIANT}"
COPY pyproject.toml README.md ./
# Not dev/: the local dev stack (moeplace_dev) reads files of the git checkout and is no part of the image.
COPY operator operator
COPY agent agent
RUN pip install --no-deps . && pip check

FROM ${PYTHON_IMAGE}
# HOME=/tmp: the chart runs the operator with a read-only root filesystem and an emptyDir at /tmp.
ENV VIRTUAL_ENV=/opt/moeplace \
    PATH=/opt/moeplace/bin:$PATH \
    HOME=/tmp \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# A named user (not only a uid): some libraries look the current user up in /etc/passwd.
RUN groupadd --gid 10001 moeplace \
    && useradd --uid 10001 --gid 10001 --home-dir /tmp --no-create-home --shell /usr/sbin/nologin moeplace
COPY --from=builder /opt/moeplace /opt/moeplace
# Numeric, so Kubernetes can verify runAsNonRoot.
USER 10001:10001
# 8080: kopf's liveness endpoint; 9090: the operator's metrics.
EXPOSE 8080 9090
ENTRYPOINT ["moeplace"]
CMD ["operator"]
