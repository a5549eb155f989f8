#!/usr/bin/env bash
# End-to-end check of the Docker deployment: real images, a real compose
# federation with TLS + SuperNode authentication, a short AutoFLIP run submitted
# with `flwr run` from the host, a refused unregistered SuperNode, and the round
# time of one CPU/memory-capped client, dense (FedAvg) vs pruned (AutoFLIP).
#
# Usage (from anywhere; needs root or a user allowed to run dockerd/docker):
#   docker/test-compose.sh
#
# Environment (all optional):
#   AUTOFLIP_DOCKER_WORK  work folder outside the repository (default /tmp/autoflip-docker):
#                         private engine data, Debian root fs, wheels, outputs, logs
#   AUTOFLIP_BASE         local (default): flwr images built from an imported Debian base
#                         (no Docker Hub needed); official: flwr/superlink, flwr/supernode,
#                         flwr/superexec pulled from Docker Hub
#   TORCH_INDEX_URL       pip index with CPU torch for the SuperExec image. Unset with the
#                         local base: a loopback index served from a local CPU torch wheel
#                         (TORCH_WHEEL, default /opt/wheels/torch-*+cpu-cp311-*.whl) plus
#                         its dependencies (pip download), and torchvision is left out
#                         (OMIT_PACKAGES=torchvision: no CPU build of it is reachable
#                         without download.pytorch.org; the apps never import it).
#                         Default with official: the PyTorch CPU index (the Dockerfile's).
#   OMIT_PACKAGES         passed to the SuperExec build (see docker/Dockerfile)
#   TORCH_INDEX_PORT      loopback port of that index (default 38471)
#   FLWR                  flwr CLI on the host (default: flwr next to PYTHON, else on PATH)
#   PYTHON                host Python with flwr installed (default: python3)
#   SUPERLINK_PORT        host port of the SuperLink on 127.0.0.1 (default: a free one)
#   EDGE_CPUS, EDGE_MEM   cap of each SuperNode / ClientApp SuperExec (default 1, 1g)
#   TIMING_ROUNDS         rounds of each timing run (default 3; 0 skips the timing)
#   KEEP_ENGINE=1         leave a dockerd that this script started running
#
# Engine: uses the Docker engine that `docker info` reaches; if none answers, starts
# a private dockerd (own data-root, exec-root, socket and pidfile under the work
# folder) and stops exactly that process at the end. Containers talk only over the
# compose network and the host's loopback (SuperLink published on 127.0.0.1; image
# builds use --network host to reach apt/PyPI and the loopback wheel index).
#
# Output: "E2E OK ..." lines, a Markdown timing table, and "ALL CHECKS PASSED".
# Exit status 0 only if every check passed.
set -euo pipefail

REPO="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)"
DOCKER_DIR="$REPO/docker"
WORK="${AUTOFLIP_DOCKER_WORK:-/tmp/autoflip-docker}"
BASE="${AUTOFLIP_BASE:-local}"
PYTHON="${PYTHON:-python3}"
FLWR="${FLWR:-}"
EDGE_CPUS="${EDGE_CPUS:-1}"
EDGE_MEM="${EDGE_MEM:-1g}"
TIMING_ROUNDS="${TIMING_ROUNDS:-3}"
FLWR_VERSION="$("$PYTHON" -c 'import flwr; print(flwr.__version__)')"
PROJECT="autoflip-e2e"
DEBIAN_IMAGE="autoflip-debian:bookworm"
NICE=(nice -n 19)
T0=$(date +%s)

log() { printf '[%4ds] %s\n' "$(($(date +%s) - T0))" "$*"; }
die() { log "FAIL: $*"; exit 1; }

case "$WORK" in "$REPO"|"$REPO"/*) die "AUTOFLIP_DOCKER_WORK must be outside the repository" ;; esac
mkdir -p "$WORK/logs"
if [ -z "$FLWR" ]; then
    FLWR="$(dirname -- "$("$PYTHON" -c 'import sys; print(sys.executable)')")/flwr"
    [ -x "$FLWR" ] || FLWR="$(command -v flwr)"
fi
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1

# ------------------------------------------------------------------- cleanup
ENGINE_PID=""
INDEX_PID=""
COMPOSE_UP=0
cleanup() {
    local rc=$?
    set +e
    if [ "$COMPOSE_UP" = 1 ]; then
        log "teardown: compose down"
        compose logs --no-color >"$WORK/logs/compose.log" 2>&1
        compose down -v --remove-orphans >>"$WORK/logs/teardown.log" 2>&1
        docker rm -f "$PROJECT-intruder" >/dev/null 2>&1
    fi
    # hand the generated keys back to the invoking user
    chown -R "$(id -u):$(id -g)" "$DOCKER_DIR/certs" "$DOCKER_DIR/keys" "$WORK/outputs" 2>/dev/null
    [ -n "$INDEX_PID" ] && kill "$INDEX_PID" 2>/dev/null && wait "$INDEX_PID" 2>/dev/null
    if [ -n "$ENGINE_PID" ] && [ "${KEEP_ENGINE:-0}" != 1 ]; then
        log "stopping the private dockerd (pid $ENGINE_PID)"
        kill "$ENGINE_PID" 2>/dev/null
        for _ in $(seq 60); do kill -0 "$ENGINE_PID" 2>/dev/null || break; sleep 1; done
        # dockerd leaves its default network namespace bind-mounted in its exec-root
        umount "$WORK/engine/exec/netns/default" 2>/dev/null
    fi
    log "finished with status $rc after $(($(date +%s) - T0)) s"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# -------------------------------------------------------------------- engine
start_engine() {
    command -v dockerd >/dev/null || die "no Docker engine answers and dockerd is not installed (apt-get install -y docker.io docker-compose debootstrap)"
    local sock="$WORK/engine/docker.sock" pidfile="$WORK/engine/dockerd.pid"
    mkdir -p "$WORK/engine"
    rm -f "$sock"
    log "starting a private dockerd (data-root $WORK/data, socket $sock)"
    dockerd --data-root "$WORK/data" --exec-root "$WORK/engine/exec" -H "unix://$sock" \
        --pidfile "$pidfile" >"$WORK/logs/dockerd.log" 2>&1 &
    ENGINE_PID=$!
    export DOCKER_HOST="unix://$sock"
    for _ in $(seq 60); do
        docker info >/dev/null 2>&1 && return 0
        kill -0 "$ENGINE_PID" 2>/dev/null || { tail -20 "$WORK/logs/dockerd.log"; ENGINE_PID=""; die "dockerd exited"; }
        sleep 1
    done
    die "dockerd did not answer within 60 s (see $WORK/logs/dockerd.log)"
}

command -v docker >/dev/null || die "no docker CLI (apt-get install -y docker.io docker-compose debootstrap)"
if docker info >/dev/null 2>&1; then
    log "using the running Docker engine (${DOCKER_HOST:-default socket})"
else
    start_engine
fi
if docker compose version >/dev/null 2>&1; then
    COMPOSE_CMD=(docker compose)
elif command -v docker-compose >/dev/null; then
    COMPOSE_CMD=(docker-compose)
else
    die "neither 'docker compose' nor docker-compose is installed"
fi
COMPOSE_FILES=(-f "$DOCKER_DIR/compose.yml" -f "$DOCKER_DIR/with-tls.yml" -f "$DOCKER_DIR/edge.yml")
compose() { "${COMPOSE_CMD[@]}" -p "$PROJECT" "${COMPOSE_FILES[@]}" "$@"; }
log "engine $(docker version --format '{{.Server.Version}}'), compose: $("${COMPOSE_CMD[@]}" version --short 2>/dev/null || echo '?')"

# -------------------------------------------------------------------- images
export AUTOFLIP_IMAGE="autoflip-superexec:$FLWR_VERSION-e2e"
if [ "$BASE" = local ]; then
    if docker image inspect "$DEBIAN_IMAGE" >/dev/null 2>&1; then
        log "reusing base image $DEBIAN_IMAGE"
    else
        command -v debootstrap >/dev/null || die "debootstrap is not installed"
        log "debootstrap bookworm (minbase) -> $WORK/rootfs, then docker import"
        rm -rf "$WORK/rootfs"
        "${NICE[@]}" debootstrap --variant=minbase bookworm "$WORK/rootfs" http://deb.debian.org/debian \
            >"$WORK/logs/debootstrap.log" 2>&1 || die "debootstrap failed (see $WORK/logs/debootstrap.log)"
        tar -C "$WORK/rootfs" -c . | docker import - "$DEBIAN_IMAGE" >/dev/null
        rm -rf "$WORK/rootfs"
    fi
    mkdir -p "$WORK/flwr-context"
    cp /etc/ssl/certs/ca-certificates.crt "$WORK/flwr-context/ca-bundle.crt"
    for role in superlink supernode superexec; do
        log "building autoflip-local/$role:$FLWR_VERSION (flwr $FLWR_VERSION on $DEBIAN_IMAGE)"
        "${NICE[@]}" docker build --network host -f "$DOCKER_DIR/flwr-local.Dockerfile" --target "$role" \
            --build-arg "DEBIAN_BASE=$DEBIAN_IMAGE" --build-arg "FLWR_VERSION=$FLWR_VERSION" \
            -t "autoflip-local/$role:$FLWR_VERSION" "$WORK/flwr-context" >"$WORK/logs/build-$role.log" 2>&1 \
            || die "build of $role failed (see $WORK/logs/build-$role.log)"
    done
    export FLWR_SUPERLINK_IMAGE="autoflip-local/superlink:$FLWR_VERSION"
    export FLWR_SUPERNODE_IMAGE="autoflip-local/supernode:$FLWR_VERSION"
    SUPEREXEC_BASE_IMAGE="autoflip-local/superexec:$FLWR_VERSION"
elif [ "$BASE" = official ]; then
    export FLWR_SUPERLINK_IMAGE="flwr/superlink:$FLWR_VERSION"
    export FLWR_SUPERNODE_IMAGE="flwr/supernode:$FLWR_VERSION"
    SUPEREXEC_BASE_IMAGE="flwr/superexec:$FLWR_VERSION"
    docker pull -q "$FLWR_SUPERLINK_IMAGE" && docker pull -q "$FLWR_SUPERNODE_IMAGE" \
        || die "cannot pull the official Flower images"
else
    die "AUTOFLIP_BASE must be local or official, got '$BASE'"
fi
export SUPEREXEC_BASE_IMAGE

# A loopback pip index with CPU torch (+ torchvision and their dependencies) for
# hosts that cannot reach download.pytorch.org.
serve_torch_index() {
    local wheel="${TORCH_WHEEL:-}"
    if [ -z "$wheel" ]; then
        wheel="$(ls /opt/wheels/torch-*+cpu-cp311-*.whl 2>/dev/null | sort -V | tail -1 || true)"
    fi
    [ -f "$wheel" ] || die "no CPU torch wheel (set TORCH_WHEEL or TORCH_INDEX_URL)"
    log "loopback torch index: $(basename "$wheel") and its dependencies; torchvision omitted"
    OMIT_PACKAGES="${OMIT_PACKAGES-torchvision}"
    rm -rf "$WORK/wheels" "$WORK/index"
    "${NICE[@]}" "$PYTHON" -m pip download -q --only-binary=:all: -d "$WORK/wheels" "$wheel" \
        >"$WORK/logs/pip-download.log" 2>&1 || die "pip download failed (see $WORK/logs/pip-download.log)"
    local f name
    for f in "$WORK"/wheels/*.whl; do  # PEP 503 layout: <normalized name>/<file>
        name="$(basename "$f" | cut -d- -f1 | tr 'A-Z_.' 'a-z--')"
        mkdir -p "$WORK/index/$name"
        ln -f "$f" "$WORK/index/$name/"
    done
    # A fixed port: the index URL is a build argument, so a new port would
    # invalidate the cached dependency layer of every rebuild.
    local port="${TORCH_INDEX_PORT:-38471}"
    "$PYTHON" -m http.server --bind 127.0.0.1 --directory "$WORK/index" "$port" >"$WORK/logs/index.log" 2>&1 &
    INDEX_PID=$!
    TORCH_INDEX_URL="http://127.0.0.1:$port/"
    for _ in $(seq 20); do
        "$PYTHON" -c "import urllib.request as u; u.urlopen('$TORCH_INDEX_URL')" 2>/dev/null && return 0
        sleep 0.5
    done
    die "the loopback wheel index did not start"
}
if [ -z "${TORCH_INDEX_URL:-}" ]; then
    if [ "$BASE" = local ]; then serve_torch_index; else TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu; fi
fi

# The SuperExec image, built from a context that holds only what the Dockerfile
# copies (works with BuildKit and with the legacy builder alike).
CTX="$WORK/app"
rm -rf "$CTX" && mkdir -p "$CTX"
cp "$REPO/pyproject.toml" "$CTX/"
cp "$REPO"/README* "$REPO"/LICENSE* "$CTX/" 2>/dev/null || true
for pkg in autoflip_strategy autoflip_task server_app client_app; do
    cp -r "$REPO/$pkg" "$CTX/"
done
find "$CTX" -name __pycache__ -prune -exec rm -rf {} +
log "building $AUTOFLIP_IMAGE from $SUPEREXEC_BASE_IMAGE (torch from $TORCH_INDEX_URL${OMIT_PACKAGES:+, without $OMIT_PACKAGES})"
"${NICE[@]}" docker build --network host -f "$DOCKER_DIR/Dockerfile" \
    --build-arg "BASE_IMAGE=$SUPEREXEC_BASE_IMAGE" --build-arg "TORCH_INDEX_URL=$TORCH_INDEX_URL" \
    --build-arg "OMIT_PACKAGES=${OMIT_PACKAGES:-}" \
    -t "$AUTOFLIP_IMAGE" "$CTX" >"$WORK/logs/build-superexec.log" 2>&1 \
    || die "SuperExec image build failed (see $WORK/logs/build-superexec.log)"
if [ -n "$INDEX_PID" ]; then kill "$INDEX_PID"; wait "$INDEX_PID" 2>/dev/null || true; INDEX_PID=""; fi
log "images ready: $(docker run --rm --entrypoint python "$AUTOFLIP_IMAGE" -c 'import flwr, torch; print("flwr", flwr.__version__, "torch", torch.__version__)')"

# --------------------------------------------------------- certificates, keys
# supernode-0..2 are registered; supernode-3 is the intruder's (never registered).
log "generate_certs.sh -> docker/certs, docker/keys"
bash "$DOCKER_DIR/generate_certs.sh" "$DOCKER_DIR" 4 >"$WORK/logs/certs.log" 2>&1
# The Flower images run as uid 49999, which must read the private keys.
chown 49999:49999 "$DOCKER_DIR/certs/server.key" "$DOCKER_DIR"/keys/supernode-[0-9] \
    || die "cannot hand the private keys to uid 49999 (run as root)"

# ----------------------------------------------------------------- federation
export SUPERLINK_PORT="${SUPERLINK_PORT:-$("$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
export SUPERLINK_BIND=127.0.0.1 EDGE_CPUS EDGE_MEM EDGE_THREADS="${EDGE_THREADS:-1}"
export AUTOFLIP_OUTPUTS="$WORK/outputs"
rm -rf "$AUTOFLIP_OUTPUTS" && mkdir -p "$AUTOFLIP_OUTPUTS" && chown 49999:49999 "$AUTOFLIP_OUTPUTS"
export FLWR_HOME="$WORK/flwr-home"
mkdir -p "$FLWR_HOME"
cat >"$FLWR_HOME/config.toml" <<TOML
[superlink]
default = "e2e"

[superlink.e2e]
address = "127.0.0.1:$SUPERLINK_PORT"
root-certificates = "$DOCKER_DIR/certs/ca.crt"
TOML

compose down -v --remove-orphans >/dev/null 2>&1 || true
COMPOSE_UP=1
log "compose up superlink (TLS, SuperNode auth) on 127.0.0.1:$SUPERLINK_PORT"
compose up -d --no-build superlink >"$WORK/logs/compose-up.log" 2>&1 || die "compose up superlink failed"
for i in $(seq 60); do
    "$FLWR" supernode list e2e >/dev/null 2>&1 && break
    [ "$i" = 60 ] && die "the SuperLink does not answer over TLS"
    sleep 1
done
for i in 0 1 2; do
    "$FLWR" supernode register "$DOCKER_DIR/keys/supernode-$i.pub" e2e >>"$WORK/logs/register.log" 2>&1 \
        || die "registering supernode-$i failed (see $WORK/logs/register.log)"
done
log "compose up (3 SuperNodes capped at cpus=$EDGE_CPUS mem=$EDGE_MEM, 4 SuperExecs)"
compose up -d --no-build >>"$WORK/logs/compose-up.log" 2>&1 || die "compose up failed"

# Submit a run from the host and wait for <outputs>/<run-name>/results.json.
# Prints the path of results.json.
run_app() {
    local name="$1" config="$2" timeout="${3:-900}" out
    out="$("$FLWR" run "$CTX" e2e --format json --run-config "$config run-name='$name' output-dir='/app/outputs'" 2>&1)" \
        || { echo "$out" >&2; return 1; }
    local run_id
    run_id="$(printf '%s' "$out" | "$PYTHON" -c 'import json,sys; print(json.load(sys.stdin).get("run-id", ""))' 2>/dev/null || true)"
    local res="$AUTOFLIP_OUTPUTS/$name/results.json" end=$(($(date +%s) + timeout))
    while [ "$(date +%s)" -lt "$end" ]; do
        if [ -f "$res" ] && "$PYTHON" -c 'import json,sys; sys.exit(json.load(open(sys.argv[1]))["status"] != "completed")' "$res" 2>/dev/null; then
            echo "$res"
            return 0
        fi
        if [ -n "$run_id" ] && "$FLWR" list e2e --run-id "$run_id" --format json 2>/dev/null | grep -q '"finished:\(failed\|stopped\)"'; then
            echo "run $name ($run_id) failed; its log:" >&2
            run_log "$name" "$run_id"
            return 1
        fi
        sleep 2
    done
    echo "run $name timed out after $timeout s; its log:" >&2
    run_log "$name" "$run_id"
    return 1
}
run_log() {  # the ServerApp's log of a run, kept in the work folder, tail on stderr
    [ -n "$2" ] || return 0
    "$FLWR" log "$2" e2e --show >"$WORK/logs/run-$1.log" 2>&1 || true
    tail -40 "$WORK/logs/run-$1.log" >&2
}

log "flwr run: short AutoFLIP run (digits, 2 rounds of 1 local epoch, 1 exploration epoch)"
RES="$(run_app e2e-autoflip "num-server-rounds=2 strategy='autoflip' local-epochs=1 explore-epochs=1")" \
    || die "the AutoFLIP run did not complete"
"$PYTHON" - "$RES" <<'PY' || die "the AutoFLIP run did not prune"
import json, sys
r = json.load(open(sys.argv[1]))
last = r["rounds"][-1]
trained = [x for x in r["rounds"] if x["round"] >= 1]  # round 0: AutoFLIP's exploration
assert r["status"] == "completed" and len(trained) == 2, (r["status"], len(trained))
assert last["density"] < 1.0, f"density {last['density']}: no pruning"
assert last["replied"], "no client replied"
print(f"E2E OK AutoFLIP over TLS: {len(trained)} rounds, density {last['density']:.3f}, "
      f"accuracy {last['accuracy']:.3f}, replies {len(last['replied'])}/{len(last['sampled'])}")
PY

# ---------------------------------------------------- unregistered SuperNode
NETWORK="$(docker network ls -q --filter "label=com.docker.compose.project=$PROJECT" | head -1)"
[ -n "$NETWORK" ] || die "compose network not found"
chown 49999:49999 "$DOCKER_DIR/keys/supernode-3"
log "starting a SuperNode with the unregistered key supernode-3"
set +e
timeout 120 docker run --name "$PROJECT-intruder" --network "$NETWORK" \
    -v "$DOCKER_DIR/certs/ca.crt:/app/certificates/ca.crt:ro" \
    -v "$DOCKER_DIR/keys/supernode-3:/app/keys/supernode-3:ro" \
    "$FLWR_SUPERNODE_IMAGE" --superlink superlink:8000 --root-certificates /app/certificates/ca.crt \
    --auth-supernode-private-key /app/keys/supernode-3 --isolation process \
    --node-config "partition-id=0 num-partitions=3" >"$WORK/logs/intruder.log" 2>&1
INTRUDER_RC=$?
set -e
docker rm -f "$PROJECT-intruder" >/dev/null 2>&1 || true
# Refused for its key (Flower: "[code: 2004] Failed to activate SuperNode", exit code
# 305), not for any other reason such as TLS or a name that does not resolve.
[ "$INTRUDER_RC" -ne 0 ] && [ "$INTRUDER_RC" -ne 124 ] && grep -q "code: 2004" "$WORK/logs/intruder.log" \
    || die "the unregistered SuperNode was not refused for its key (exit $INTRUDER_RC, see $WORK/logs/intruder.log)"
NODES="$("$FLWR" supernode list e2e --format json 2>/dev/null | "$PYTHON" -c 'import json,sys; d=json.load(sys.stdin); print(len(d.get("nodes", d.get("supernodes", []))))' 2>/dev/null || echo '?')"
log "E2E OK unregistered SuperNode refused: exit $INTRUDER_RC, '$(grep -m1 -o 'code: 2004.*' "$WORK/logs/intruder.log")' ($(grep -m1 -o 'Exit Code: *[0-9]*' "$WORK/logs/intruder.log")); SuperNodes known to the SuperLink: $NODES"

# -------------------------------------------------------- capped-client timing
if [ "$TIMING_ROUNDS" -gt 0 ]; then
    # One client (fraction-train 0.34 of 3, min-train-nodes 1) trains per round, on an iid partition,
    # so each round's client time is one capped client's local training.
    # Exploration (before round 1) is shortened to one client and one epoch: it is
    # not what is timed.
    COMMON="num-server-rounds=$TIMING_ROUNDS fraction-train=0.34 min-train-nodes=1 partitioning='iid' local-epochs=2"
    COMMON="$COMMON explore-fraction=0.34 explore-epochs=1"
    declare -A TIMING
    for spec in "fedavg|strategy='fedavg'" \
                "autoflip|strategy='autoflip' sparsity=0.5 structured-sparsity=0.2 value-precision='float32'" \
                "autoflip-s0.5|strategy='autoflip' sparsity=0.5 structured-sparsity=0.5 value-precision='float32'"; do
        label="${spec%%|*}"
        log "timing run $label ($TIMING_ROUNDS rounds, 1 client/round, cpus=$EDGE_CPUS mem=$EDGE_MEM)"
        TIMING[$label]="$(run_app "e2e-time-$label" "$COMMON ${spec#*|}" 1800)" || die "timing run $label failed"
    done
    "$PYTHON" - "${TIMING[fedavg]}" "${TIMING[autoflip]}" "${TIMING[autoflip-s0.5]}" "$EDGE_CPUS" "$EDGE_MEM" <<'PY'
import json, statistics, sys

def stats(path):
    r = json.load(open(path))
    # training rounds 2..N (round 0 is AutoFLIP's exploration; round 1 also pays
    # first-message costs such as the mask download)
    rounds = [x for x in r["rounds"] if x["round"] >= 2] or r["rounds"]
    per_client = [x["client_train_seconds"] / max(len(x["replied"]), 1) for x in rounds]
    return (r["config"], rounds[-1]["density"], statistics.median(per_client),
            statistics.median(x["seconds"] for x in rounds), rounds[-1]["accuracy"])

rows = [("FedAvg (dense)", *stats(sys.argv[1])), ("AutoFLIP default", *stats(sys.argv[2])),
        ("AutoFLIP structured 0.5", *stats(sys.argv[3]))]
dense = rows[0][3]
print(f"\nCapped client (cpus={sys.argv[4]}, mem_limit={sys.argv[5]}): median over rounds 2..N, one client per round")
print("| Strategy | sparsity / structured | density | client train s / round | round wall s | train time vs FedAvg |")
print("| --- | --- | --- | --- | --- | --- |")
for name, cfg, density, client, wall, acc in rows:
    sp = "-" if cfg["strategy"] == "fedavg" else f"{cfg['sparsity']} / {cfg['structured-sparsity']}"
    print(f"| {name} | {sp} | {density:.3f} | {client:.2f} | {wall:.2f} | {client / dense:.2f}x |")
print()
PY
fi

log "ALL CHECKS PASSED in $(($(date +%s) - T0)) s"
