#!/usr/bin/env bash
# The change stream's cost, off against on, alternated in one session (docs/events.md):
#   max    playhead-loadgen `max` (1 M keys rewritten ~10×/s, binary), ROUNDS × (off, on)
#   fleet  playhead-loadgen `fleet` at VIEWERS viewers, (off, on) FLEET_ROUNDS times
# "on" = `[events] kind = "nats"` against a local nats-server -js (file store in a temp
# dir), which runs through the whole session, for the "off" runs too.
#
#   bash bench/events.sh                      # both, defaults below
#   SECTIONS=max ROUNDS=3 bash bench/events.sh
#
# Server: PLAYHEAD_SERVER__WORKER_THREADS=${SERVER_THREADS:-1}, otherwise its defaults, a
# fresh data dir per run. Generator: --threads ${LOADGEN_THREADS:-1}. Each run prints
# acknowledged heartbeats/s, batch p99, store rows and events published in the measured
# run, and the SIGTERM drain (the final flush writes — and with events on publishes —
# every key still dirty). Results: target/events-bench/results.jsonl.
# Needs: nats-server (Debian package), python3, curl; builds the release binaries.
set -euo pipefail
cd "$(dirname "$0")/.."

SECTIONS=${SECTIONS:-"max fleet"}
ROUNDS=${ROUNDS:-2}
FLEET_ROUNDS=${FLEET_ROUNDS:-1}
KEYS=${KEYS:-1000000}
VIEWERS=${VIEWERS:-1000000}
MAX_DURATION=${MAX_DURATION:-15}
MAX_WARMUP=${MAX_WARMUP:-5}
FLEET_DURATION=${FLEET_DURATION:-60}
FLEET_WARMUP=${FLEET_WARMUP:-15}
SERVER_THREADS=${SERVER_THREADS:-1}
LOADGEN_THREADS=${LOADGEN_THREADS:-1}
HTTP_PORT=${HTTP_PORT:-18090}
BIN_PORT=${BIN_PORT:-17090}
NATS_PORT=${NATS_PORT:-14222}
OUT=${OUT:-target/events-bench}
mkdir -p "$OUT"
RESULTS="$OUT/results.jsonl"
: > "$RESULTS"

NATS=$(command -v nats-server || echo /usr/sbin/nats-server)
[ -x "$NATS" ] || { echo "nats-server is not installed (apt-get install nats-server)" >&2; exit 1; }
if [ -z "${BIN:-}" ]; then cargo build --release -q -p playhead -p playhead-loadgen; fi
BIN=${BIN:-target/release/playhead}
LOADGEN=${LOADGEN:-target/release/playhead-loadgen}

WORK=$(mktemp -d -p "${TMPDIR:-/tmp}" playhead-events-bench.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done; rm -rf "$WORK"; }
trap cleanup EXIT

"$NATS" -a 127.0.0.1 -p "$NATS_PORT" -js -sd "$WORK/nats" > "$OUT/nats.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 100); do (echo > "/dev/tcp/127.0.0.1/$NATS_PORT") 2>/dev/null && break; sleep 0.1; done

metric() { # NAME: its value on the server's /metrics page (0 when absent)
  curl -s "127.0.0.1:$HTTP_PORT/metrics" | awk -v n="$1" '$1 == n {print $2; f=1} END {if (!f) print 0}'
}

# run SECTION EVENTS(off|on) ROUND: one server, one generator run, SIGTERM; one JSON line.
run() {
  local section=$1 events=$2 round=$3 data env=()
  data=$(mktemp -d -p "$WORK" data.XXXXXX)
  if [ "$events" = on ]; then
    env=(PLAYHEAD_EVENTS__KIND=nats PLAYHEAD_EVENTS__URL="nats://127.0.0.1:$NATS_PORT")
  fi
  env PLAYHEAD_SERVER__WORKER_THREADS="$SERVER_THREADS" PLAYHEAD_SERVER__DATA_DIR="$data" \
    PLAYHEAD_HTTP__LISTEN="127.0.0.1:$HTTP_PORT" PLAYHEAD_BINARY__LISTEN="127.0.0.1:$BIN_PORT" \
    PLAYHEAD_FLUSH__SHUTDOWN_TIMEOUT_MS=120000 "${env[@]}" RUST_LOG=warn \
    "$BIN" serve > "$OUT/server-$section-$events-$round.log" 2>&1 &
  local server=$!
  PIDS+=("$server")
  for _ in $(seq 100); do curl -sf "127.0.0.1:$HTTP_PORT/healthz" >/dev/null && break; sleep 0.1; done
  local report="$OUT/loadgen-$section-$events-$round.json"
  local args
  if [ "$section" = max ]; then
    args=(max --keys "$KEYS" --connections 4 --batch 1024 --in-flight 16
          --duration-secs "$MAX_DURATION" --warmup-secs "$MAX_WARMUP")
  else
    args=(fleet --viewers "$VIEWERS" --connections 8
          --duration-secs "$FLEET_DURATION" --warmup-secs "$FLEET_WARMUP")
  fi
  "$LOADGEN" "${args[@]}" --threads "$LOADGEN_THREADS" --quiet --json "$report" \
    --binary-addr "127.0.0.1:$BIN_PORT" --http-addr "127.0.0.1:$HTTP_PORT" \
    > "$OUT/loadgen-$section-$events-$round.txt" 2>&1
  local rows published failed
  rows=$(metric playhead_flush_rows_total)
  published=$(metric playhead_events_published_total)
  failed=$(metric playhead_events_failed_total)
  local t0; t0=$(date +%s.%N)
  kill -TERM "$server"; wait "$server" || true
  local drain; drain=$(python3 -c "print(round($(date +%s.%N) - $t0, 2))")
  local left; left=$(grep -o 'left_in_log=[0-9]*' "$OUT/server-$section-$events-$round.log" | tail -1 || true)
  python3 - "$section" "$events" "$round" "$report" "$rows" "$published" "$failed" "$drain" "$left" >> "$RESULTS" <<'PY'
import json, sys
section, events, rnd, path, rows, published, failed, drain, left = sys.argv[1:]
r = json.load(open(path))
print(json.dumps({"section": section, "events": events, "round": int(rnd),
    "acked_per_sec": round(r["acked_per_sec"]), "ratio": round(r.get("due_acked_ratio", 1.0), 4),
    "busy": r.get("busy"), "p99_ms": r["latency"]["p99"],
    "rows_during_run": int(float(rows)), "events_during_run": int(float(published)),
    "events_failed": int(float(failed)), "drain_s": float(drain), "shutdown": left}))
PY
  tail -1 "$RESULTS" >&2
  rm -rf "$data"
}

for section in $SECTIONS; do
  n=$ROUNDS; [ "$section" = fleet ] && n=$FLEET_ROUNDS
  for round in $(seq "$n"); do
    # Alternated: off first in odd rounds, on first in even ones.
    if [ $((round % 2)) = 1 ]; then order="off on"; else order="on off"; fi
    for events in $order; do run "$section" "$events" "$round"; done
  done
done

python3 - "$RESULTS" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
print(f"{'section':<7} {'events':<6} {'round':>5} {'ack/s':>11} {'ratio':>7} {'p99ms':>8} {'rows':>9} {'events':>9} {'failed':>6} {'drain s':>8}  shutdown")
for r in rows:
    print(f"{r['section']:<7} {r['events']:<6} {r['round']:>5} {r['acked_per_sec']:>11} {r['ratio']:>7.4f} {r['p99_ms']:>8.2f} "
          f"{r['rows_during_run']:>9} {r['events_during_run']:>9} {r['events_failed']:>6} {r['drain_s']:>8}  {r['shutdown']}")
PY
