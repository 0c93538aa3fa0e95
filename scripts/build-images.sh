#!/usr/bin/env bash
# Build the autodl images with Docker: autodl-hub:<version> and autodl-agent:<version>-<flavor>.
#
#   scripts/build-images.sh [hub|agent|all]        (default: all)
#
# Environment:
#   BASE_IMAGE      base of both images (default python:3.11-slim-bookworm when Docker
#                   has it or can pull it, else autodl-base:bookworm, see MAKE_BASE)
#   MAKE_BASE=1     when no registry is reachable: build autodl-base:bookworm from Debian
#                   packages with debootstrap (root, apt) and `docker import` it
#   AGENT_FLAVOR    cpu (default) | cuda | jetson; cuda and jetson need BASE_IMAGE
#   ORT_PACKAGE     ONNX Runtime requirement for the agent (default by flavor)
#   WHEELHOUSE      1 (default): resolve every wheel with this machine's pip (its indexes,
#                   proxies and certificates) and serve them to the build on 127.0.0.1,
#                   so the build itself needs no network; 0: pip in the build uses its index
#   TORCH_SPEC      torch for the hub (default torch==2.13.0+cpu, the CPU build)
#   TORCH_INDEX_URL index holding TORCH_SPEC (default https://download.pytorch.org/whl/cpu)
#   PYTHON          Python 3.11 with pip for the wheelhouse (default .venv/bin/python)
#   DOCKER_BUILDKIT 0 by default: the legacy builder of Debian's docker.io needs no buildx
set -euo pipefail
cd "$(dirname "$0")/.."

what=${1:-all}
case "$what" in hub | agent | all) ;; *) echo "usage: $0 [hub|agent|all]" >&2; exit 2 ;; esac

export DOCKER_BUILDKIT=${DOCKER_BUILDKIT:-0}
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -1)
AGENT_FLAVOR=${AGENT_FLAVOR:-cpu}
WHEELHOUSE=${WHEELHOUSE:-1}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0+cpu}
TORCH_INDEX_URL=${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || command -v python3)}
WORK=build/images
mkdir -p "$WORK"

log() { printf '== %s\n' "$*" >&2; }

case "$AGENT_FLAVOR" in
    cpu) ORT_PACKAGE=${ORT_PACKAGE-onnxruntime} ;;
    cuda) ORT_PACKAGE=${ORT_PACKAGE-onnxruntime-gpu} ;;
    jetson) ORT_PACKAGE=${ORT_PACKAGE-} ;;  # JetPack's onnxruntime-gpu from the base image
    *) echo "AGENT_FLAVOR must be cpu, cuda or jetson" >&2; exit 2 ;;
esac
if [ "$AGENT_FLAVOR" != cpu ] && [ -z "${BASE_IMAGE:-}" ]; then
    echo "AGENT_FLAVOR=$AGENT_FLAVOR needs BASE_IMAGE (an NVIDIA CUDA runtime or L4T image)" >&2
    exit 2
fi

make_base() {
    # A minimal Debian bookworm (Python 3.11, venv, CA certificates) from apt alone.
    local root="$WORK/rootfs"
    command -v debootstrap >/dev/null || { echo "install debootstrap (apt-get install debootstrap)" >&2; exit 1; }
    log "debootstrap bookworm into $root"
    rm -rf "$root"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        bookworm "$root" "${DEBIAN_MIRROR:-http://deb.debian.org/debian}" >"$WORK/debootstrap.log"
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
    tar -C "$root" -c . | docker import -c 'ENV LANG=C.UTF-8' -c 'CMD ["/bin/bash"]' - autodl-base:bookworm >/dev/null
    rm -rf "$root"
}

if [ -z "${BASE_IMAGE:-}" ]; then
    if docker image inspect python:3.11-slim-bookworm >/dev/null 2>&1 \
        || { [ "${MAKE_BASE:-0}" != 1 ] && docker pull -q python:3.11-slim-bookworm >/dev/null 2>&1; }; then
        BASE_IMAGE=python:3.11-slim-bookworm
    else
        BASE_IMAGE=autodl-base:bookworm
        if ! docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
            if [ "${MAKE_BASE:-0}" = 1 ]; then
                make_base
            else
                echo "no base image: python:3.11-slim-bookworm cannot be pulled; rerun with MAKE_BASE=1" \
                    "(debootstrap) or set BASE_IMAGE" >&2
                exit 1
            fi
        fi
    fi
fi
log "base image $BASE_IMAGE"

server_pid=""
cleanup() { if [ -n "$server_pid" ]; then kill "$server_pid" 2>/dev/null || true; fi; }
trap cleanup EXIT

# Build args that point pip at the wheelhouse; filled by serve_wheels.
pip_args=()
serve_wheels() {
    local dir=$1 port
    port=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    "$PYTHON" -m http.server --bind 127.0.0.1 --directory "$dir" "$port" >"$WORK/wheel-server.log" 2>&1 &
    server_pid=$!
    for _ in $(seq 50); do
        "$PYTHON" -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$port/')" 2>/dev/null && break
        sleep 0.1
    done
    pip_args=(--network host --build-arg PIP_NO_INDEX=1 --build-arg "PIP_FIND_LINKS=http://127.0.0.1:$port/")
}
stop_wheels() { cleanup; server_pid=""; pip_args=(); }

wheels() {
    # Wheels for every requirement, built or fetched by this machine's pip.
    local dir=$1
    shift
    mkdir -p "$dir"
    log "wheelhouse $dir"
    "$PYTHON" -m pip wheel -q --wheel-dir "$dir" setuptools wheel "$@"
}

build_agent() {
    local tag="autodl-agent:$VERSION-$AGENT_FLAVOR" extra=()
    [ "$AGENT_FLAVOR" = jetson ] && extra+=(--build-arg VENV_OPTIONS=--system-site-packages)
    if [ "$WHEELHOUSE" = 1 ]; then
        "$PYTHON" scripts/agent_requirements.py --ort "$ORT_PACKAGE" >"$WORK/agent-requirements.txt"
        wheels "$WORK/wheels-agent" -r "$WORK/agent-requirements.txt"
        serve_wheels "$WORK/wheels-agent"
    fi
    log "building $tag"
    docker build -f Dockerfile.agent -t "$tag" -t "autodl-agent:$AGENT_FLAVOR" \
        --build-arg "BASE_IMAGE=$BASE_IMAGE" --build-arg "ORT_PACKAGE=$ORT_PACKAGE" \
        "${extra[@]}" "${pip_args[@]}" .
    stop_wheels
}

build_hub() {
    local tag="autodl-hub:$VERSION" torch_index=$TORCH_INDEX_URL
    if [ "$WHEELHOUSE" = 1 ]; then
        local index_args=()
        # Only ask the PyTorch index when it answers: pip would otherwise retry it for minutes.
        if curl -fsS -m 10 -o /dev/null "$TORCH_INDEX_URL/" 2>/dev/null; then
            index_args=(--extra-index-url "$TORCH_INDEX_URL")
        fi
        wheels "$WORK/wheels-hub" "${index_args[@]}" "$TORCH_SPEC" ".[hub]"
        serve_wheels "$WORK/wheels-hub"
        torch_index=""
    fi
    log "building $tag"
    docker build -f Dockerfile.hub -t "$tag" -t autodl-hub:latest \
        --build-arg "BASE_IMAGE=$BASE_IMAGE" --build-arg "TORCH_SPEC=$TORCH_SPEC" \
        --build-arg "TORCH_INDEX_URL=$torch_index" "${pip_args[@]}" .
    stop_wheels
}

case "$what" in
    agent) build_agent ;;
    hub) build_hub ;;
    all) build_agent && build_hub ;;
esac
docker image ls --format '{{.Repository}}:{{.Tag}}\t{{.Size}}' | grep -E '^autodl-(hub|agent):' >&2 || true
