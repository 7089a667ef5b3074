# syntax=docker/dockerfile:1
#
# Token Gateway image.
#
#   docker build -t token-gateway:dev .
#   docker run --rm --read-only --tmpfs /tmp -p 8080:8080 -p 9090:9090 \
#     -v "$PWD/gateway.yaml:/etc/gateway/gateway.yaml:ro" token-gateway:dev
#
# Two stages: `builder` turns the source tree into a wheel and installs it with its dependencies into a
# virtualenv at /opt/venv; the final stage copies only that virtualenv onto a clean python:3.11-slim.
# Every dependency ships manylinux wheels for CPython 3.11, so no compiler is needed.
#
# At run time the process writes nothing outside /tmp (Prometheus multiprocess files with --workers > 1),
# so the container runs with a read-only root filesystem and a tmpfs (or emptyDir) on /tmp.

ARG PYTHON_IMAGE=python:3.11-slim

# --------------------------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src
RUN python -m venv /opt/venv

# Only what the wheel is built from (.dockerignore keeps the context to these, too).
COPY pyproject.toml README.md ./
COPY gateway ./gateway

# Build the wheel, install it with its dependencies, then drop pip and setuptools from the virtualenv: the runtime
# needs neither. The last step fails the build if the console script cannot start.
RUN python -m pip wheel --no-deps --wheel-dir /wheels . \
 && /opt/venv/bin/pip install /wheels/*.whl \
 && /opt/venv/bin/pip uninstall --yes pip setuptools \
 && /opt/venv/bin/gateway --help >/dev/null

# --------------------------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime

LABEL org.opencontainers.image.title="token-gateway" \
      org.opencontainers.image.description="A reverse proxy that lets a request through only when its bearer token is valid right now." \
      org.opencontainers.image.licenses="Apache-2.0"

# A fixed numeric uid/gid, so Kubernetes runAsNonRoot can verify it and volume permissions are predictable.
RUN groupadd --system --gid 10001 gateway \
 && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home \
            --shell /usr/sbin/nologin gateway \
 && mkdir -p /etc/gateway

# Same base image and path as in the builder, so the virtualenv's interpreter links stay valid.
COPY --from=builder /opt/venv /opt/venv

# PYTHONDONTWRITEBYTECODE: the root filesystem is read-only; the installed modules are already compiled.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    GATEWAY_CONFIG=/etc/gateway/gateway.yaml \
    GATEWAY_HEALTHCHECK_URL=http://127.0.0.1:9090/healthz

# Mount the config at /etc/gateway/gateway.yaml (ConfigMap / bind mount) and secrets such as the signing key
# under /etc/gateway/keys/. The image bakes in no config and no key.
USER 10001:10001

# 8080: proxy listener (listen.port). 9090: admin listener (admin.port): /metrics, /healthz, /readyz, /admin/*.
# The admin listener must bind 0.0.0.0 (admin.host) to be scraped from outside the container.
EXPOSE 8080 9090

# slim has no curl: ask Python (-I: isolated, nothing imported from the working directory). /healthz answers 200
# while the process runs; any other answer or a connection error fails the check.
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python", "-I", "-c", "import os, sys, urllib.request; r = urllib.request.urlopen(os.environ.get('GATEWAY_HEALTHCHECK_URL', 'http://127.0.0.1:9090/healthz'), timeout=2); sys.exit(r.status != 200)"]

# Exec form: the gateway is PID 1 and receives SIGTERM (drain, then exit) and SIGHUP (reload config) itself.
STOPSIGNAL SIGTERM
ENTRYPOINT ["gateway"]
CMD ["run", "--config", "/etc/gateway/gateway.yaml"]
