# fedq for the coordinator and the workers: the official slim Python image and a CPU build of PyTorch
# (the default CUDA build would make the image several GB). `docker compose up --build` uses it as it is.
#
# Where no registry is in reach, the same file builds from a bare Debian image with Debian's Python
# and a PyTorch wheel from the build context: scripts/fedq-image.sh passes
#   --build-arg BASE=local/debian:bookworm --build-arg TORCH_INDEX= --build-arg TORCH_SPEC=/wheelhouse/torch-....whl
# (and INDEX_CA, below, where the package index is reached through a TLS-inspecting proxy).
ARG BASE=python:3.11-slim
FROM ${BASE}
# A bare Debian base has no Python: Debian's own (3.11 on bookworm).
RUN if ! command -v python3 >/dev/null; then \
      apt-get update -qq \
      && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3 python3-venv ca-certificates \
      && rm -rf /var/lib/apt/lists/*; \
    fi \
 && python3 -m venv /opt/fedq
ENV PATH=/opt/fedq/bin:$PATH PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# wheelhouse*: wheels for a build with no registry (scripts/fedq-image.sh puts PyTorch there), absent
# otherwise; pyproject.toml beside it keeps the COPY from having nothing to copy.
COPY pyproject.toml wheelhouse* /wheelhouse/
# INDEX_CA: a CA bundle in the wheelhouse for a package index behind a TLS-inspecting proxy.
ARG INDEX_CA=
# PyTorch first, so that installing fedq keeps the build chosen here.
ARG TORCH_SPEC="torch>=2.1,<3"
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN if [ -n "$INDEX_CA" ]; then export PIP_CERT="$INDEX_CA"; fi; pip install ${TORCH_INDEX:+--index-url "$TORCH_INDEX"} "${TORCH_SPEC}"
WORKDIR /app
COPY pyproject.toml README.md ./
COPY fedq ./fedq
COPY shared ./shared
COPY coordinator ./coordinator
COPY worker ./worker
# PIP_CERT, not --cert: pip's build isolation installs setuptools in a pip of its own, which reads it too.
RUN if [ -n "$INDEX_CA" ]; then export PIP_CERT="$INDEX_CA"; fi; pip install . && rm -rf /wheelhouse
RUN useradd --create-home fedq
USER fedq
# A site's state (.fedq-state) and a run's files land under the working folder: /app is root's.
WORKDIR /home/fedq
ENTRYPOINT ["fedq"]
