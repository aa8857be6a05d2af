# mesh-agent: one agent per container (docker-compose.yml runs the demo mesh; deploy/kubernetes/ a DaemonSet).
# Build: docker build -t mesh-agent .     Run: docker run --rm mesh-agent --help
#
# Two build arguments, for machines that cannot pull images or reach the package index from a build
# (README.md, "Building the image offline"; docker/build-offline.sh does both for you):
#   BASE_IMAGE  any image with python3 (and its venv module) on PATH; default the official slim image.
#   WHEELS      a directory of the build context holding the wheels of mesh-agent and every dependency
#               (pip wheel / pip download on the host); empty (the default): pip fetches from the index.
ARG BASE_IMAGE=python:3.11-slim

# -- build: a virtual environment with the package and its dependencies -----------------------------------
FROM ${BASE_IMAGE} AS build
ARG WHEELS=
ENV PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# Only what the package needs (see .dockerignore); none of it reaches the final image but the venv.
# pip and setuptools are not needed to run an agent: they leave the venv once it is filled.
COPY . /src
RUN python3 -m venv /opt/mesh-agent \
 && if [ -n "$WHEELS" ]; then \
        /opt/mesh-agent/bin/pip install --no-index --find-links "/src/$WHEELS" mesh-agent; \
    else \
        /opt/mesh-agent/bin/pip install /src; \
    fi \
 && /opt/mesh-agent/bin/pip uninstall --yes --quiet pip setuptools \
 && /opt/mesh-agent/bin/python -m compileall -q /opt/mesh-agent/lib > /dev/null

# -- the image: the base plus that venv, nothing else ----------------------------------------------------
FROM ${BASE_IMAGE}
COPY --from=build /opt/mesh-agent /opt/mesh-agent
# Unbuffered: `docker compose logs` shows each line as it is printed.  The byte code was compiled above.
ENV PATH=/opt/mesh-agent/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# A fixed uid, so a mounted volume or a Kubernetes securityContext can name it.
RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/mesh-agent --create-home mesh
USER mesh
WORKDIR /var/lib/mesh-agent
# The tunnel key and run-time registrations live here (mount a volume to keep them across re-creation).
ENV MESH_DATA_DIR=/var/lib/mesh-agent

# gossip (UDP and TCP), encrypted tunnels; the API stays on the container's loopback.
EXPOSE 7946/udp 7946/tcp 7948/tcp

# Healthy when the local API answers GET /v1/health with 200.  bash's /dev/tcp, not a Python interpreter:
# a check every 10 s then costs a shell's start, a small fraction of an interpreter's (README.md).
# MESH_API is HOST:PORT ([::1]:PORT for IPv6); HTTP/1.0 without Host is what the API lets a health check send.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["bash", "-c", "a=${MESH_API:-127.0.0.1:7947}; h=${a%:*}; h=${h#[}; h=${h%]}; exec 3<>/dev/tcp/$h/${a##*:} && printf 'GET /v1/health HTTP/1.0\\r\\n\\r\\n' >&3 && read -r -t 2 v s _ <&3 && [ \"$s\" = 200 ]"]

ENTRYPOINT ["mesh-agent"]
CMD ["agent"]
