# syntax=docker/dockerfile:1
#
# The admission gateway as a container image: slim, non-root, config mounted from outside.
#
#   docker build -t admission-gateway:local .
#   docker run --rm -p 8080:8080 -p 127.0.0.1:9464:9464 \
#     -v "$PWD/deploy/compose/gateway.yaml:/etc/gateway/gateway.yaml:ro" admission-gateway:local
#
# The mounted config must set `admin_listen: 0.0.0.0:9464` for the admin port to be reachable
# from outside the container (the HEALTHCHECK below runs inside it, on 127.0.0.1:9464), and with
# it `admin_token` (or `admin_open: true` where a firewall guards the port): the gateway refuses
# a non-loopback admin port without either.
# docs/deploy.md has the details.

ARG PYTHON_IMAGE=python:3.11-slim

# --- builder: a virtualenv with the project installed the way the README does (pip install) ---
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/gateway
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway ./gateway
RUN --mount=type=cache,target=/root/.cache/pip /opt/gateway/bin/pip install .

# --- final: the same Python image with only the virtualenv copied in ---
FROM ${PYTHON_IMAGE}
ENV PATH=/opt/gateway/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
RUN groupadd --system --gid 10001 gateway \
 && useradd --system --uid 10001 --gid gateway --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin gateway \
 && mkdir -p /etc/gateway
COPY --from=builder /opt/gateway /opt/gateway
USER 10001:10001
EXPOSE 8080 9464
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9464/healthz', timeout=2)"]
ENTRYPOINT ["gateway"]
CMD ["serve", "-c", "/etc/gateway/gateway.yaml"]
