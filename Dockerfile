# meshbridge: one image for the CA service (`meshbridge-ca`) and the cluster agent (`meshbridge-agent`).
#   docker build -t localhost/meshbridge:0.1.0 .
#   docker run --rm localhost/meshbridge:0.1.0                         # meshbridge-ca --help
#   docker run --rm localhost/meshbridge:0.1.0 meshbridge-agent --help
# Without a registry: `bash scripts/image.sh build` builds this file with buildah on a Debian base
# made by mmdebstrap (docs/image.md). The tag is always meshbridge:<version in pyproject.toml>, the
# charts' default image (tests/deploy/test_image.py holds the three in step).
# No ENTRYPOINT: the Helm charts and docker-compose.yml name the command they run.
#
# BASE_IMAGE: any Debian-like image with Python 3.11 as `python3` and its venv module, groupadd and
# useradd (python:3.11-slim has it in /usr/local/bin, Debian's python3 is /usr/bin/python3).
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

# The virtualenv keeps the install off the base's own Python (Debian marks its python3 as
# externally managed, PEP 668) and is first on PATH, so `python`, `meshbridge-ca` and
# `meshbridge-agent` resolve to it on either base.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/meshbridge/venv \
    PATH=/opt/meshbridge/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

# uid/gid 10001, as the charts' securityContext expects. /data is created owned by it, so a fresh
# named volume mounted there (docker-compose.yml) starts out writable by the CA service.
RUN groupadd --system --gid 10001 meshbridge \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin meshbridge \
 && mkdir -p /data \
 && chown 10001:10001 /data \
 && chmod 0700 /data

# Only what the package needs: no tests, no local data directories (which may hold root keys).
WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
COPY meshbridge_wire ./meshbridge_wire
COPY ca_server ./ca_server
COPY cluster_agent ./cluster_agent
# PIP_CERT (optional): a CA bundle for pip behind a TLS-intercepting proxy, bind-mounted for the
# build only (scripts/image.sh does so); as an ARG it is never part of the image's environment.
ARG PIP_CERT
# constraints.txt pins the frameworks whose internals the speed-ups hook (bench/RESULTS.md).
# The RUN's working directory is /, not /src: with /src as its working directory, buildah 1.28
# left an empty /src in the image after `rm -rf /src` (tests/deploy/test_image.py saw it).
WORKDIR /
RUN python3 -m venv "$VIRTUAL_ENV" \
 && cd /src \
 && pip install -c constraints.txt . \
 && cd / \
 && rm -rf /src

USER 10001:10001
WORKDIR /data
# 8443: CA service (HTTPS); 9090: agent /healthz, /readyz, /metrics.
EXPOSE 8443 9090
CMD ["meshbridge-ca", "--help"]
