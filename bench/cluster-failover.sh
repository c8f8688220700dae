#!/usr/bin/env bash
# Failover on a shared Cassandra cluster: three Playhead nodes (store.kind = "cassandra", one
# keyspace) behind HAProxy with deploy/haproxy.cfg; `fleet --servers` sends every heartbeat
# to its account's node through playhead::client::ClusterClient. KILL_AT seconds into the
# run one node is kill -9'd (its accounts move to their next nodes, which read what it had
# flushed from Cassandra); RESTART_AT it starts again on the same data directory (its commit
# log replays; the late flush is safe by last-write-wins) and gets its accounts back. After
# the run `--verify` reads keys back through HAProxy once every key has gone idle and been
# flushed (VERIFY_AFTER > flush.idle_ms + flush.interval_ms).
#
#   CASSANDRA=127.0.0.2:9042,127.0.0.3:9042,127.0.0.4:9042 CASSANDRA_DC=dc1 \
#   REPLICATION='{dc1=3,dc2=1}' bash bench/cluster-failover.sh
#
# READ_TIMEOUT_MS sets the nodes' store.read_timeout_ms (default 70): on a small shared
# machine the verify's Cassandra reads can miss 70 ms and answer `degraded` (position 0).
# The verify asks a degraded answer again (5 times, 3 s in all) and reports the keys right
# on a retry apart ("degraded then right"); a wrong answer, or one degraded every time, is a
# mismatch. A verify request whose connection fails (HAProxy cuts a node's connections when
# it marks the node down) is sent again on a new connection, up to 5 times; the report
# counts them ("sent again on a new connection") and the answer is judged like any other.
# The end prints HAProxy's node state changes during the run (its log).
# KILL_NODE=0 runs without a kill (a capacity run). CPU_PIDS="pid pid …" (e.g. the Cassandra
# nodes' JVMs) reports the cores those processes used during the fleet, next to the
# Playhead nodes' own (the killed node's only up to its kill).
#
# Needs: a running Cassandra/ScyllaDB cluster (the keyspace is created if missing), release
# binaries (built here), haproxy. Ports 17171–3, 18181–3, 18100 and 18504 on 127.0.0.1.
# Data under a fresh temp dir, removed at the end (KEEP=1 keeps it and the logs).
set -euo pipefail
. "$(dirname "$0")/lib.sh"

CASSANDRA=${CASSANDRA:?set CASSANDRA to the local datacenter nodes, host:port,...}
CASSANDRA_DC=${CASSANDRA_DC:-datacenter1}
REPLICATION=${REPLICATION:-"{$CASSANDRA_DC=3}"}
KEYSPACE=${KEYSPACE:-playhead_bench_cluster}
VIEWERS=${VIEWERS:-100000}
DURATION=${DURATION:-60}
WARMUP=${WARMUP:-5}
KILL_NODE=${KILL_NODE:-2}
KILL_AT=${KILL_AT:-20}
RESTART_AT=${RESTART_AT:-35}
VERIFY_AFTER=${VERIFY_AFTER:-15}
VERIFY_SAMPLE=${VERIFY_SAMPLE:-20000}
CONNECTIONS=${CONNECTIONS:-2}
bench_init failover

contact_points() { # a,b,c -> ["a","b","c"]
    local out="" p
    IFS=, read -ra pts <<<"$CASSANDRA"
    for p in "${pts[@]}"; do out+="${out:+,}\"$p\""; done
    echo "[$out]"
}
POINTS=$(contact_points)

node() { # n: node n on HTTP 1818n, binary 1717n, data in $WORK/n$n (log appended)
    start_node "n$1" "1818$1" "1717$1" PLAYHEAD_WAL__SYNC_MODE=group \
        PLAYHEAD_STORE__KIND=cassandra PLAYHEAD_STORE__CASSANDRA__CONTACT_POINTS="$POINTS" \
        PLAYHEAD_STORE__CASSANDRA__LOCAL_DATACENTER="$CASSANDRA_DC" \
        PLAYHEAD_STORE__CASSANDRA__KEYSPACE="$KEYSPACE" \
        PLAYHEAD_STORE__CASSANDRA__DATACENTER_REPLICATION="$REPLICATION" \
        PLAYHEAD_STORE__CASSANDRA__CREATE_SCHEMA=true RUST_LOG=info \
        PLAYHEAD_STORE__READ_TIMEOUT_MS="${READ_TIMEOUT_MS:-70}"
}
metric() { # n name: one sample of node n's /metrics
    curl -sf "http://127.0.0.1:1818$1/metrics" | awk -v m="$2" '$1 == m { print $2 }'
}
sum_metric() { # name: summed over the three nodes
    local total=0 v n
    for n in 1 2 3; do v=$(metric "$n" "$1"); total=$(awk -v a="$total" -v b="${v:-0}" 'BEGIN { print a + b }'); done
    echo "$total"
}

# One at a time: concurrent CREATE KEYSPACE IF NOT EXISTS can disagree on the schema.
for n in 1 2 3; do node "$n"; wait_http "http://127.0.0.1:1818$n/readyz"; done
start_haproxy 127.0.0.1:18100 127.0.0.1:18504 127.0.0.1:18181 127.0.0.1:18182 127.0.0.1:18183
wait_http "http://127.0.0.1:18100/healthz"

ticks() { # pids...: their user+system CPU ticks so far
    local total=0 p
    for p in "$@"; do
        [ -r "/proc/$p/stat" ] && total=$((total + $(awk '{ print $14 + $15 }' "/proc/$p/stat")))
    done
    echo "$total"
}
HZ=$(getconf CLK_TCK)
rows0=$(sum_metric playhead_cassandra_rows_written_total)
read -ra cpu_pids <<<"${CPU_PIDS:-}"
others_cpu0=$(ticks "${cpu_pids[@]}")
nodes_cpu0=$(ticks "${NODE_PID[@]}")
echo "== fleet: $VIEWERS viewers for ${WARMUP}+${DURATION} s over 3 nodes; node $KILL_NODE kill -9 at ${KILL_AT} s, restart at ${RESTART_AT} s"
started=$(date +%s.%N)
"$LOADGEN" fleet --viewers "$VIEWERS" --duration-secs "$DURATION" --warmup-secs "$WARMUP" \
    --connections "$CONNECTIONS" --servers 127.0.0.1:17171,127.0.0.1:17172,127.0.0.1:17173 \
    --http-addr 127.0.0.1:18100 --verify --verify-sample "$VERIFY_SAMPLE" \
    --verify-after-secs "$VERIFY_AFTER" --account-base "$(( (RANDOM << 20) + 3000000000 ))" \
    --quiet >"$WORK/fleet.out" 2>&1 &
FLEET=$!
PIDS+=($FLEET)
at() { sleep "$(awk -v s="$started" -v t="$1" -v now="$(date +%s.%N)" 'BEGIN { d = s + t - now; print (d > 0 ? d : 0) }')"; }

if [ "$KILL_NODE" != 0 ]; then
at "$KILL_AT"
killed_cpu=$(ticks "${NODE_PID[n$KILL_NODE]}")
rows_kill=$(metric "$KILL_NODE" playhead_cassandra_rows_written_total)
kill_node "n$KILL_NODE"
echo "killed node $KILL_NODE at $(awk -v s="$started" -v now="$(date +%s.%N)" 'BEGIN { printf "%.1f", now - s }') s (it had written $rows_kill rows)"
at "$RESTART_AT"
t0=$(date +%s.%N)
node "$KILL_NODE"
wait_http "http://127.0.0.1:1818$KILL_NODE/readyz" 600
echo "node $KILL_NODE restarted: answering after $(awk -v s="$t0" -v now="$(date +%s.%N)" 'BEGIN { printf "%.2f", now - s }') s; $(grep 'commit log replayed' "$WORK/n$KILL_NODE.log" | tail -1 | sed 's/.*INFO //')"
fi

status=0
wait "$FLEET" || status=$?
fleet_s=$(awk -v s="$started" -v now="$(date +%s.%N)" 'BEGIN { print now - s }')
others_cpu=$(( $(ticks "${cpu_pids[@]}") - others_cpu0 ))
nodes_cpu=$(( $(ticks "${NODE_PID[@]}") - nodes_cpu0 + ${killed_cpu:-0} ))
cat "$WORK/fleet.out"
echo "== after the run"
echo "rows written to Cassandra by the 3 nodes during it: $(awk -v a="$(sum_metric playhead_cassandra_rows_written_total)" -v b="$rows0" -v k="${rows_kill:-0}" 'BEGIN { print a - b + k }')"
awk -v t="$fleet_s" -v p="$nodes_cpu" -v o="$others_cpu" -v hz="$HZ" 'BEGIN {
    printf "CPU over the %.0f s of the fleet (warm-up and verify included): Playhead nodes %.2f cores, CPU_PIDS %.2f cores\n", t, p / hz / t, o / hz / t }'
for n in 1 2 3; do
    echo "node $n: store reads memory=$(metric "$n" 'playhead_store_reads_total{source="memory"}') store=$(metric "$n" 'playhead_store_reads_total{source="store"}') degraded=$(metric "$n" 'playhead_store_reads_total{source="degraded"}'), write errors $(metric "$n" 'playhead_cassandra_errors_total{op="write"}')"
done
# HAProxy logs each change twice (its alert on stderr, its log on stdout): the alerts only.
transitions=$(grep '^\[WARNING\]' "$WORK/haproxy.log" | grep -o 'Server playhead/node[0-9] is [A-Z]*' | sed 's|Server playhead/||' | paste -sd, - || true)
echo "HAProxy's node state changes: ${transitions:-none}"
term_nodes
for n in 1 2 3; do echo "node $n: $(grep 'shutdown complete' "$WORK/n$n.log" | tail -1 | sed 's/.*INFO //')"; done
exit "$status"
