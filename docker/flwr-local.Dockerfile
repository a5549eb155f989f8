# Local stand-in for the official flwr/superlink, flwr/supernode and flwr/superexec
# images, for machines that cannot pull from Docker Hub (used by
# docker/test-compose.sh; a normal Docker host uses the official images).
#
# The base is any Debian bookworm root file system imported into Docker, e.g.
#   debootstrap --variant=minbase bookworm rootfs http://deb.debian.org/debian
#   tar -C rootfs -c . | docker import - autoflip-debian:bookworm
# apt and pip need the network during the build (`docker build --network host`).
# The build context is a folder holding `ca-bundle.crt`, the CA bundle pip should
# trust (the host's /etc/ssl/certs/ca-certificates.crt: hosts whose HTTPS goes
# through an inspecting proxy need its CA; elsewhere it is the normal system list):
#
#   mkdir ctx && cp /etc/ssl/certs/ca-certificates.crt ctx/ca-bundle.crt
#   docker build --network host -f docker/flwr-local.Dockerfile --target superlink \
#       -t autoflip-local/superlink:1.41.0 ctx
#
# Targets: superlink, supernode, superexec (the same Python environment, as in
# Flower's images: user `app` uid 49999, HOME=/app, virtualenv /python/venv owned
# by `app`, flwr pinned); they differ only in the entrypoint.
ARG DEBIAN_BASE=autoflip-debian:bookworm
FROM ${DEBIAN_BASE} AS base

ARG FLWR_VERSION=1.41.0
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 49999 --home-dir /app --create-home --shell /bin/sh app \
    && python3 -m venv /python/venv \
    && chown -R app:app /python/venv

COPY ca-bundle.crt /etc/ssl/certs/pip-ca-bundle.crt
ENV PATH=/python/venv/bin:$PATH \
    PIP_CERT=/etc/ssl/certs/pip-ca-bundle.crt \
    FLWR_TELEMETRY_ENABLED=0 \
    FLWR_DISABLE_UPDATE_CHECK=1
USER app
WORKDIR /app
RUN python -m pip install --no-cache-dir "flwr==${FLWR_VERSION}" \
    && python -c "import flwr; assert flwr.__version__ == '${FLWR_VERSION}', flwr.__version__"

FROM base AS superlink
ENTRYPOINT ["flower-superlink"]

FROM base AS supernode
ENTRYPOINT ["flower-supernode"]

FROM base AS superexec
ENTRYPOINT ["flower-superexec"]
