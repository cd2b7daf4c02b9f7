# gateway-guard: a small, non-root image of the guard (also runs the simulated upstream for demos).
#
#   docker build -t gateway-guard .
#   docker run --rm -p 127.0.0.1:8090:8090 -v "$PWD/my-guard.toml:/etc/gateway-guard/guard.toml:ro" gateway-guard
#
# Stage 1 builds a virtual environment with the package and its wheels; stage 2 copies only that venv onto
# a clean slim base: no compiler, no pip, no sources, no build caches in the final image.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv /opt/venv
COPY pyproject.toml README.md ./
COPY gateway_guard ./gateway_guard
RUN /opt/venv/bin/pip install . \
 && /opt/venv/bin/pip uninstall --yes pip \
 && find /opt/venv -name '__pycache__' -prune -exec rm -rf {} +

FROM ${PYTHON_IMAGE}
RUN groupadd --system --gid 10001 guard \
 && useradd --system --uid 10001 --gid guard --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin guard \
 && mkdir -p /etc/gateway-guard
COPY --from=build /opt/venv /opt/venv
# GUARD__SERVER__HOST=0.0.0.0: inside a container 127.0.0.1 is the container's own loopback, which a
# published port (-p) cannot reach; the container's network namespace is the boundary instead. Publish on
# the host's loopback (-p 127.0.0.1:8090:8090) to keep the guard local. The environment wins over the file.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    GUARD__SERVER__HOST=0.0.0.0 \
    GUARD__SERVER__PORT=8090
USER guard:guard
EXPOSE 8090
# python, not curl: slim images have no curl. Exit 0 only on a 200 from the guard's liveness endpoint.
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import os, sys, urllib.request; port = os.environ.get('GUARD__SERVER__PORT', '8090'); r = urllib.request.urlopen(f'http://127.0.0.1:{port}/guard/health', timeout=2); sys.exit(0 if r.status == 200 else 1)"]
ENTRYPOINT ["gateway-guard"]
CMD ["--config", "/etc/gateway-guard/guard.toml"]
