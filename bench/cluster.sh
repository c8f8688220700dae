#!/usr/bin/env bash
# A cluster run: three Playhead nodes on loopback (embedded store each) behind HAProxy with
# deploy/haproxy.cfg; `fleet --servers` sends every heartbeat to its account's node through
# playhead::ingest::binary::client::ClusterClient and `--verify` reads the keys back through HAProxy, so a
# disagreement between the ring and HAProxy shows as mismatches. Then the same fleet against
# one node, for comparison on the same machine.
#
#   bash bench/cluster.sh                         # 400 000 viewers, 10 s
#   VIEWERS=2000000 DURATION=30 bash bench/cluster.sh
#
# Needs: release binaries (built here) and haproxy (apt-get install haproxy). Ports 17071–3,
# 18081–3, 17091, 18091, 18000 and 18404 on 127.0.0.1. Data under a fresh temp dir, removed
# at the end; every process it starts is stopped when it exits.
set -euo pipefail
cd "$(dirname "$0")/.."

VIEWERS=${VIEWERS:-400000}
DURATION=${DURATION:-10}
CONNECTIONS=${CONNECTIONS:-2}
SERVER_THREADS=${SERVER_THREADS:-1}
HAPROXY=$(command -v haproxy || echo /usr/sbin/haproxy)
[ -x "$HAPROXY" ] || { echo "bench/cluster.sh needs haproxy (apt-get install haproxy)" >&2; exit 1; }

cargo build --release -q -p playhead -p playhead-loadgen
BIN=target/release/playhead
LOADGEN=target/release/playhead-loadgen
WORK=$(mktemp -d "${TMPDIR:-/tmp}/playhead-cluster.XXXXXX")
PIDS=()
stop_all() {
    for pid in "${PIDS[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    PIDS=()
}
trap 'stop_all; rm -rf "$WORK"' EXIT

node() { # name http_port binary_port
    mkdir -p "$WORK/$1"
    PLAYHEAD_SERVER__DATA_DIR="$WORK/$1" PLAYHEAD_SERVER__WORKER_THREADS=$SERVER_THREADS \
    PLAYHEAD_HTTP__LISTEN=127.0.0.1:$2 PLAYHEAD_BINARY__LISTEN=127.0.0.1:$3 RUST_LOG=warn \
        "$BIN" serve >"$WORK/$1.log" 2>&1 &
    PIDS+=($!)
}
wait_http() { # url
    for _ in $(seq 1 100); do
        curl -sf -o /dev/null "$1" && return 0
        sleep 0.1
    done
    echo "no answer from $1" >&2
    exit 1
}

echo "== cluster: 3 nodes behind HAProxy, fleet --servers, verify through HAProxy"
for i in 1 2 3; do node "n$i" "1808$i" "1707$i"; done
PLAYHEAD_LB_BIND=127.0.0.1:18000 PLAYHEAD_LB_STATS=127.0.0.1:18404 \
PLAYHEAD_LB_NODE1=127.0.0.1:18081 PLAYHEAD_LB_NODE2=127.0.0.1:18082 PLAYHEAD_LB_NODE3=127.0.0.1:18083 \
    "$HAPROXY" -db -f deploy/haproxy.cfg >"$WORK/haproxy.log" 2>&1 &
PIDS+=($!)
for i in 1 2 3; do wait_http "http://127.0.0.1:1808$i/readyz"; done
wait_http "http://127.0.0.1:18000/healthz"
"$LOADGEN" fleet --viewers "$VIEWERS" --duration-secs "$DURATION" --connections "$CONNECTIONS" \
    --servers 127.0.0.1:17071,127.0.0.1:17072,127.0.0.1:17073 --http-addr 127.0.0.1:18000 \
    --verify --quiet
stop_all

echo "== one node, fleet direct"
node single 18091 17091
wait_http "http://127.0.0.1:18091/readyz"
"$LOADGEN" fleet --viewers "$VIEWERS" --duration-secs "$DURATION" --connections "$CONNECTIONS" \
    --binary-addr 127.0.0.1:17091 --http-addr 127.0.0.1:18091 --verify --quiet
