# mesh-agent: one agent per container (docker-compose.yml runs the demo mesh; deploy/kubernetes/ a DaemonSet).
# Build: docker build -t mesh-agent .     Run: docker run --rm mesh-agent --help
FROM python:3.11-slim

# Unbuffered: `docker compose logs` shows each line as it is printed.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Only what the package needs (see .dockerignore); the source tree is removed once installed.
COPY . /src
RUN pip install /src && rm -rf /src

# A fixed uid, so a mounted volume or a Kubernetes securityContext can name it.
RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/mesh-agent --create-home mesh
USER mesh
WORKDIR /var/lib/mesh-agent
# The tunnel key and run-time registrations live here (mount a volume to keep them across re-creation).
ENV MESH_DATA_DIR=/var/lib/mesh-agent

# gossip (UDP and TCP), encrypted tunnels; the API stays on the container's loopback.
EXPOSE 7946/udp 7946/tcp 7948/tcp

# Healthy when the local API answers GET /v1/health (python, since the slim image has no curl).
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://' + os.environ.get('MESH_API', '127.0.0.1:7947') + '/v1/health', timeout=2)"]

ENTRYPOINT ["mesh-agent"]
CMD ["agent"]
