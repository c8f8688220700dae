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
# at the end (KEEP=1 keeps it and the logs); every process it starts is stopped when it
# exits (bench/lib.sh).
set -euo pipefail
. "$(dirname "$0")/lib.sh"

VIEWERS=${VIEWERS:-400000}
DURATION=${DURATION:-10}
CONNECTIONS=${CONNECTIONS:-2}
bench_init cluster

echo "== cluster: 3 nodes behind HAProxy, fleet --servers, verify through HAProxy"
for i in 1 2 3; do start_node "n$i" "1808$i" "1707$i"; done
start_haproxy 127.0.0.1:18000 127.0.0.1:18404 127.0.0.1:18081 127.0.0.1:18082 127.0.0.1:18083
for i in 1 2 3; do wait_http "http://127.0.0.1:1808$i/readyz"; done
wait_http "http://127.0.0.1:18000/healthz"
"$LOADGEN" fleet --viewers "$VIEWERS" --duration-secs "$DURATION" --connections "$CONNECTIONS" \
    --servers 127.0.0.1:17071,127.0.0.1:17072,127.0.0.1:17073 --http-addr 127.0.0.1:18000 \
    --verify --quiet
stop_all

echo "== one node, fleet direct"
start_node single 18091 17091
wait_http "http://127.0.0.1:18091/readyz"
"$LOADGEN" fleet --viewers "$VIEWERS" --duration-secs "$DURATION" --connections "$CONNECTIONS" \
    --binary-addr 127.0.0.1:17091 --http-addr 127.0.0.1:18091 --verify --quiet
