# meshbridge: one image for the CA service (`meshbridge-ca`) and the cluster agent (`meshbridge-agent`).
#   docker build -t meshbridge:0.1.0 .
#   docker run --rm meshbridge:0.1.0                                   # meshbridge-ca --help
#   docker run --rm meshbridge:0.1.0 meshbridge-agent --help
# No ENTRYPOINT: the Helm charts and docker-compose.yml name the command they run.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Only what the package needs: no tests, no local data directories (which may hold root keys).
WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
COPY meshbridge_wire ./meshbridge_wire
COPY ca_server ./ca_server
COPY cluster_agent ./cluster_agent
# constraints.txt pins the frameworks whose internals the speed-ups hook (bench/RESULTS.md)
RUN pip install -c constraints.txt . \
 && rm -rf /src

# uid/gid 10001, as the charts' securityContext expects. /data is created owned by it, so a fresh
# named volume mounted there (docker-compose.yml) starts out writable by the CA service.
RUN groupadd --system --gid 10001 meshbridge \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin meshbridge \
 && mkdir -p /data \
 && chown 10001:10001 /data \
 && chmod 0700 /data

USER 10001:10001
WORKDIR /data
# 8443: CA service (HTTPS); 9090: agent /healthz, /readyz, /metrics.
EXPOSE 8443 9090
CMD ["meshbridge-ca", "--help"]
