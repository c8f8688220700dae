# Shared by the cluster benches (bench/cluster.sh, bench/cluster-failover.sh): release
# binaries, a work directory, Playhead nodes and HAProxy started in the background, and
# every one of them stopped when the script exits. Source it after `set -euo pipefail`:
#
#   . "$(dirname "$0")/lib.sh"
#   bench_init cluster                     # build, $WORK, the exit trap
#   start_node n1 18081 17071 PLAYHEAD_WAL__SYNC_MODE=group
#   start_haproxy 127.0.0.1:18000 127.0.0.1:18404 127.0.0.1:18081 127.0.0.1:18082 127.0.0.1:18083
#   wait_http http://127.0.0.1:18081/readyz
#
# SERVER_THREADS (default 1) sets each node's PLAYHEAD_SERVER__WORKER_THREADS; KEEP=1 keeps
# $WORK (data and logs) instead of removing it.

cd "$(dirname "${BASH_SOURCE[0]}")/.."

SERVER_THREADS=${SERVER_THREADS:-1}
HAPROXY=$(command -v haproxy || echo /usr/sbin/haproxy)
# Where `cargo build --release` puts them: CARGO_TARGET_DIR when set (e.g. a release
# target kept apart from the debug one), else target/.
BIN=${CARGO_TARGET_DIR:-target}/release/playhead
LOADGEN=${CARGO_TARGET_DIR:-target}/release/playhead-loadgen
# Background processes to kill -9 at exit: HAProxy, generators (PIDS), and the nodes by
# name (NODE_PID), so a script can kill, restart or stop one node by its name.
PIDS=()
declare -A NODE_PID=()

# bench_init NAME: checks for haproxy, builds the release binaries, makes $WORK
# (${TMPDIR:-/tmp}/playhead-NAME.XXXXXX) and installs the exit trap.
bench_init() {
    [ -x "$HAPROXY" ] || { echo "bench $1 needs haproxy (apt-get install haproxy)" >&2; exit 1; }
    cargo build --release -q -p playhead -p playhead-loadgen
    WORK=$(mktemp -d "${TMPDIR:-/tmp}/playhead-$1.XXXXXX")
    trap bench_cleanup EXIT
}

# kill -9 every process started here and reap it.
stop_all() {
    local pid
    for pid in "${PIDS[@]}" "${NODE_PID[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}" "${NODE_PID[@]}"; do wait "$pid" 2>/dev/null || true; done
    PIDS=()
    NODE_PID=()
}

bench_cleanup() {
    stop_all
    if [ "${KEEP:-0}" = 1 ]; then echo "kept $WORK"; else rm -rf "$WORK"; fi
}

# start_node NAME HTTP_PORT BINARY_PORT [VAR=VALUE ...]: `playhead serve` on 127.0.0.1 in
# the background, data in $WORK/NAME (kept across restarts), log appended to
# $WORK/NAME.log; the VAR=VALUE pairs (PLAYHEAD_* settings, RUST_LOG) come last and win.
start_node() {
    local name=$1 http=$2 binary=$3
    shift 3
    mkdir -p "$WORK/$name"
    env PLAYHEAD_SERVER__DATA_DIR="$WORK/$name" PLAYHEAD_SERVER__WORKER_THREADS="$SERVER_THREADS" \
        PLAYHEAD_HTTP__LISTEN="127.0.0.1:$http" PLAYHEAD_BINARY__LISTEN="127.0.0.1:$binary" \
        RUST_LOG=warn "$@" "$BIN" serve >>"$WORK/$name.log" 2>&1 &
    NODE_PID[$name]=$!
}

# kill_node NAME: kill -9, as a crash, and reap it.
kill_node() {
    kill -9 "${NODE_PID[$1]}" 2>/dev/null || true
    wait "${NODE_PID[$1]}" 2>/dev/null || true
    unset "NODE_PID[$1]"
}

# term_nodes: SIGTERM every node and wait for each to exit (its final flush).
term_nodes() {
    local name
    for name in "${!NODE_PID[@]}"; do kill -TERM "${NODE_PID[$name]}" 2>/dev/null || true; done
    for name in "${!NODE_PID[@]}"; do wait "${NODE_PID[$name]}" 2>/dev/null || true; done
    NODE_PID=()
}

# start_haproxy BIND STATS NODE1 NODE2 NODE3: deploy/haproxy.cfg in the foreground mode,
# in the background, log in $WORK/haproxy.log.
start_haproxy() {
    PLAYHEAD_LB_BIND=$1 PLAYHEAD_LB_STATS=$2 \
    PLAYHEAD_LB_NODE1=$3 PLAYHEAD_LB_NODE2=$4 PLAYHEAD_LB_NODE3=$5 \
        "$HAPROXY" -db -f deploy/haproxy.cfg >>"$WORK/haproxy.log" 2>&1 &
    PIDS+=($!)
}

# wait_http URL [TRIES]: until URL answers 2xx, every 0.1 s, TRIES times (default 300).
wait_http() {
    local _
    for _ in $(seq 1 "${2:-300}"); do
        curl -sf -o /dev/null "$1" && return 0
        sleep 0.1
    done
    echo "no answer from $1" >&2
    exit 1
}
