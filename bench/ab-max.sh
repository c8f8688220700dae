#!/usr/bin/env bash
# A/B of `max` (1 M keys): main's build (A) vs alt20's (B), alternated A B A B, fresh
# server each run. Server: 1 runtime worker; loadgen: 1 thread; ports away from the
# defaults (other helpers share the machine).
set -euo pipefail
A=${A:-/tmp/alt20-bin/main/playhead}; B=${B:-/tmp/alt20-bin/alt20/playhead}
LOADGEN=${LOADGEN:-/tmp/alt20-bin/alt20/playhead-loadgen}
HTTP=28080; BINP=27070; OUT=${OUT:-/tmp/alt20-max}; mkdir -p "$OUT"
run() { # NAME BIN ROUND
  local data; data=$(mktemp -d /tmp/alt20-maxdata.XXXXXX)
  PLAYHEAD_SERVER__DATA_DIR="$data" PLAYHEAD_SERVER__WORKER_THREADS=1 \
    PLAYHEAD_HTTP__LISTEN="127.0.0.1:$HTTP" PLAYHEAD_BINARY__LISTEN="127.0.0.1:$BINP" \
    RUST_LOG=warn "$2" serve > "$OUT/$1-$3.log" 2>&1 &
  local pid=$!
  for _ in $(seq 100); do curl -sf "127.0.0.1:$HTTP/healthz" >/dev/null 2>&1 && break; sleep 0.1; done
  "$LOADGEN" max --keys 1000000 --connections 4 --batch 1024 --in-flight 16 --protocol binary \
    --threads 1 --duration-secs 10 --warmup-secs 2 --binary-addr "127.0.0.1:$BINP" \
    --http-addr "127.0.0.1:$HTTP" --quiet --json "$OUT/$1-$3.json" > /dev/null 2>&1
  local rss; rss=$(awk '/VmRSS/ {print $2}' /proc/$pid/status)
  kill -TERM $pid; wait $pid || true
  rm -rf "$data"
  python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(sys.argv[2], sys.argv[3], round(r['acked_per_sec']), 'acked/s  p99', r['latency']['p99'], 'ms  rss_kb', sys.argv[4])" "$OUT/$1-$3.json" "$1" "$3" "$rss"
}
for round in 1 2; do run main "$A" $round; run alt20 "$B" $round; done
