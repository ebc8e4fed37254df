# fedrec's SuperLink image: Flower's official SuperLink, plus what the TLS compose
# deployment (compose.yml) relies on. Nothing secret is baked in: the CA certificate, the
# server certificate and key and the SuperExec secret are mounted at run time.
#
#   docker build -f docker/superlink.Dockerfile -t fedrec/superlink:1.41.0 docker
ARG FLWR_VERSION=1.41.0
FROM flwr/superlink:${FLWR_VERSION}

LABEL org.opencontainers.image.title="fedrec-superlink" \
      org.opencontainers.image.description="Flower SuperLink for fedrec's TLS deployment"

# The base image's unprivileged user `app` (uid 49999, HOME=/app), by number (hadolint DL3066).
USER 49999
WORKDIR /app

# /app/state holds the SuperLink database (--database /app/state/superlink.db): registered
# SuperNode keys and runs survive a restart. Created here, owned by `app`, so that a fresh
# named volume mounted on it is writable by the unprivileged user.
RUN mkdir -p /app/state

# Healthy = serving HTTPS on 8000 with a certificate that the mounted CA
# (/app/certificates/ca.crt) accepts for 127.0.0.1. Python's standard library only: the
# image has no curl.
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import ssl, urllib.request as r; r.urlopen('https://127.0.0.1:8000/health', timeout=4, context=ssl.create_default_context(cafile='/app/certificates/ca.crt'))"]

ENTRYPOINT ["flower-superlink"]
