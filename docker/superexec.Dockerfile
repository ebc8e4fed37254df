# fedrec's SuperExec image: runs fedrec's ServerApp (next to the SuperLink) and its
# ClientApp (next to every SuperNode). In Flower 1.41 both are started by
# `flower-superexec`, which picks the app type from the task it acquires; the app code
# itself is not baked in: `flwr run` ships it as a FAB and the SuperExec installs it.
# What the image must carry is the app's Python dependencies, CPU-only.
#
# Build (from the repository root; multi-arch, no platform is hard-coded):
#   docker build -f docker/superexec.Dockerfile -t fedrec/superexec:1.41.0 docker
#   docker buildx build --platform linux/amd64,linux/arm64 -f docker/superexec.Dockerfile docker
ARG FLWR_VERSION=1.41.0
# Python 3.12: inside fedrec's requires-python (>=3.11,<3.13).
ARG BASE_VARIANT=py3.12-ubuntu24.04
FROM flwr/superexec:${FLWR_VERSION}-${BASE_VARIANT}

LABEL org.opencontainers.image.title="fedrec-superexec" \
      org.opencontainers.image.description="Flower SuperExec with fedrec's runtime dependencies (CPU-only torch)"

# The base image's unprivileged user `app` (uid 49999, HOME=/app), by number (hadolint
# DL3066). It owns the image's virtual environment, so nothing below needs root.
USER 49999
WORKDIR /app

COPY requirements.txt /opt/fedrec/requirements.txt

# 1. torch from PyTorch's CPU index only (--index-url, not --extra-index-url: the CUDA
#    build on PyPI must not win). PyTorch publishes amd64 and arm64 Linux wheels there.
# 2. The rest from PyPI; opacus' torch requirement is already satisfied by step 1.
# 3. Fail the build if a CUDA build slipped in anyway.
# 4. /app/runs: where the ServerApp writes its run directory (run-dir="runs/...", relative
#    to /app); created here so a named volume mounted on it is writable by `app`.
RUN python -m pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 \
    && python -m pip install --no-cache-dir --requirement /opt/fedrec/requirements.txt \
    && python -c "import torch; assert torch.version.cuda is None, torch.__version__" \
    && mkdir -p /app/runs

ENTRYPOINT ["flower-superexec"]
