#!/usr/bin/env bash
# Builds the mesh-agent image where neither python:3.11-slim nor the package index can be reached from a
# build: the base image from Debian's packages (mmdebstrap, imported with `docker import`), the wheels on
# this host (pip wheel / pip download, through whatever index this host's pip reaches), then the ordinary
# Dockerfile with its BASE_IMAGE and WHEELS build arguments.  README.md, "Building the image offline".
#
#   docker/build-offline.sh                 # -> mesh-agent:demo, what docker-compose.yml runs
#   MESH_IMAGE=mesh-agent:0.1.0 docker/build-offline.sh
#
# Environment (all optional):
#   MESH_IMAGE       the image to build                      [mesh-agent:demo]
#   MESH_BASE_IMAGE  the base image; made once, reused after [mesh-agent-base:bookworm]
#   MESH_WHEELS      wheel directory, inside the repository  [build/wheels]
#   MESH_SUITE       Debian suite of the base                [bookworm: Python 3.11, as the default image]
#   MESH_MIRROR      Debian mirror for mmdebstrap            [this host's apt sources]
#   REBUILD_BASE=1   make the base image again even if it exists
# Needs: docker (a running engine), mmdebstrap (apt-get install mmdebstrap), python3 with pip, root or a
# user mmdebstrap can run as.
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=${MESH_IMAGE:-mesh-agent:demo}
BASE=${MESH_BASE_IMAGE:-mesh-agent-base:bookworm}
WHEELS=${MESH_WHEELS:-build/wheels}
SUITE=${MESH_SUITE:-bookworm}
PYTHON=${PYTHON:-python3}

say() { printf '%s\n' "build-offline: $*" >&2; }
die() { say "$*"; exit 1; }

command -v docker >/dev/null || die "docker is not installed (apt-get install docker.io)"
docker info >/dev/null 2>&1 || die "no Docker engine answers (start it: dockerd, or systemctl start docker)"
case "$WHEELS" in /*|*..*) die "MESH_WHEELS must be a directory inside the repository (the build context)";; esac

# 1. The base: a minimal Debian root file system with python3 and its venv module, as an image.
#    The name is our own: nothing here pretends to be an official image.
if [ -n "${REBUILD_BASE:-}" ] || ! docker image inspect "$BASE" >/dev/null 2>&1; then
    command -v mmdebstrap >/dev/null || die "mmdebstrap is not installed (apt-get install mmdebstrap)"
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    say "making $BASE from Debian $SUITE (mmdebstrap) ..."
    # Documentation, man pages and locales are dropped as dpkg unpacks them: no agent reads them.
    # merged-usr by a hook, not the usrmerge package (which pulls in the whole of perl: 50 MB).
    mmdebstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
        --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
        --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/info/*' \
        --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-include=/usr/share/locale/locale.alias' \
        --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin' \
        "$SUITE" "$tmp/base.tar" ${MESH_MIRROR:+"$MESH_MIRROR"} >"$tmp/mmdebstrap.log" 2>&1 \
        || { tail -n 20 "$tmp/mmdebstrap.log" >&2; die "mmdebstrap failed"; }
    docker import --change 'CMD ["python3"]' --message "mmdebstrap $SUITE minbase + python3" \
        "$tmp/base.tar" "$BASE" >/dev/null
    rm -rf "$tmp"
    trap - EXIT
fi

# 2. The wheels, for the base's Python (which need not be this host's): ours built here, the
#    dependencies as the index's binary wheels for that Python and this machine's architecture.
pyver=$(docker run --rm --entrypoint python3 "$BASE" -c 'import sys; print(f"{sys.version_info[0]}{sys.version_info[1]}")')
arch=$(uname -m)
say "wheels for CPython $pyver on $arch into $WHEELS ..."
rm -rf "$WHEELS"
mkdir -p "$WHEELS"
# From a copy of the package's files: setuptools leaves build/lib behind in a source tree, and a file
# deleted since would still go into the wheel from there.
src=$(mktemp -d)
trap 'rm -rf "$src"' EXIT
packages=$("$PYTHON" -c 'import tomllib; print(" ".join(tomllib.load(open("pyproject.toml", "rb"))["tool"]["setuptools"]["packages"]))')
# shellcheck disable=SC2086  # the package names are words
cp -r pyproject.toml README.md $packages "$src"/
find "$src" -name __pycache__ -prune -exec rm -rf {} +
"$PYTHON" -m pip wheel --quiet --no-deps --wheel-dir "$WHEELS" "$src"
rm -rf "$src"
trap - EXIT
"$PYTHON" -m pip download --quiet --only-binary=:all: --python-version "$pyver" --implementation cp \
    --abi "cp$pyver" --abi abi3 --abi none --platform "manylinux2014_$arch" --platform "manylinux_2_17_$arch" \
    --platform "manylinux_2_28_$arch" --platform any --dest "$WHEELS" "$WHEELS"/mesh_agent-*.whl

# 3. The image, from the same Dockerfile as an online build.
say "building $IMAGE on $BASE ..."
docker build --quiet --build-arg "BASE_IMAGE=$BASE" --build-arg "WHEELS=$WHEELS" -t "$IMAGE" . >/dev/null
size=$(docker image inspect --format '{{.Size}}' "$IMAGE")
say "built $IMAGE ($((size / 1000000)) MB); run the demo with: docker-compose up -d   (no --build), or export"
say "  MESH_BASE_IMAGE=$BASE MESH_WHEELS=$WHEELS so that docker-compose up --build builds it this way too"
