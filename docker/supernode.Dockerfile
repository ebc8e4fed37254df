# fedrec's SuperNode image: Flower's official SuperNode (it needs none of fedrec's
# dependencies: with --isolation process the ClientApp runs in the SuperExec container
# next to it, built from superexec.Dockerfile). Small and multi-arch, for kiosks. The CA
# certificate and the node's private key are mounted at run time, never baked in.
#
#   docker build -f docker/supernode.Dockerfile -t fedrec/supernode:1.41.0 docker
ARG FLWR_VERSION=1.41.0
FROM flwr/supernode:${FLWR_VERSION}

LABEL org.opencontainers.image.title="fedrec-supernode" \
      org.opencontainers.image.description="Flower SuperNode for fedrec's TLS deployment"

# The base image's unprivileged user `app` (uid 49999, HOME=/app), by number (hadolint DL3066).
USER 49999
WORKDIR /app

# Healthy = the SuperNode's Runtime API answers on port 9094 (compose.yml serves it there,
# on the internal network the SuperNode shares with its own SuperExec only).
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request as r; r.urlopen('http://127.0.0.1:9094/health', timeout=4)"]

ENTRYPOINT ["flower-supernode"]
