#!/usr/bin/env bash
# Instructions per acknowledged heartbeat, counted by valgrind's callgrind: a figure that does
# not move with the machine's load (the same binary and input give the same count within a
# few percent, whatever else runs), for an A/B of two builds on a noisy shared machine.
#
#   bash bench/instructions.sh                          # this tree's release build
#   BINS="/tmp/playhead-a /tmp/playhead-b" ROUNDS=2 bash bench/instructions.sh
#                                                      # two builds, alternated a b b a ...
#
# Each run: the server (1 runtime worker) under callgrind; a `max` warm-up writes every key
# once; the counters are zeroed (callgrind_control -z); a fixed-rate `max` (RATE heartbeats/s
# over KEYS keys for SECS seconds, so flush cycles are in the window too); the counters are
# dumped; instructions in the window ÷ records the commit log appended in it. The /metrics
# scrapes that count the records fall outside the window. Needs valgrind (installed from
# Debian when missing and apt-get is available) and release binaries (built here unless BINS
# is given).
set -euo pipefail
cd "$(dirname "$0")/.."

KEYS=${KEYS:-100000}
RATE=${RATE:-20000}
SECS=${SECS:-30}
ROUNDS=${ROUNDS:-1}
OUT=${OUT:-target/instructions}
HTTP_PORT=${HTTP_PORT:-18180}
BIN_PORT=${BIN_PORT:-17170}
mkdir -p "$OUT"

if ! command -v valgrind >/dev/null && command -v apt-get >/dev/null; then
  apt-get install -y -q valgrind >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q valgrind >/dev/null; }
fi
command -v valgrind >/dev/null || { echo "valgrind missing" >&2; exit 1; }
if [ -z "${BINS:-}" ]; then cargo build --release -q -p playhead -p playhead-loadgen; fi
BINS=${BINS:-target/release/playhead}
LOADGEN=${LOADGEN:-target/release/playhead-loadgen}

SERVER=
cleanup() { [ -n "$SERVER" ] && kill -9 "$SERVER" 2>/dev/null || true; }
trap cleanup EXIT

records() { curl -s "127.0.0.1:$HTTP_PORT/metrics" | awk '/^playhead_wal_appended_records_total/ {print $2}'; }
load() {
  "$LOADGEN" max --keys "$KEYS" --connections 2 --batch 256 --in-flight 4 --threads 1 \
    --duration-secs "$1" --warmup-secs 0 --rate "$RATE" --binary-addr "127.0.0.1:$BIN_PORT" \
    --quiet > /dev/null 2>&1
}

one() {
  local bin=$1 label=$2 data
  data=$(mktemp -d -p "${TMPDIR:-/tmp}" playhead-instr.XXXXXX)
  PLAYHEAD_SERVER__WORKER_THREADS=1 PLAYHEAD_SERVER__DATA_DIR="$data" \
    PLAYHEAD_HTTP__LISTEN=127.0.0.1:$HTTP_PORT PLAYHEAD_BINARY__LISTEN=127.0.0.1:$BIN_PORT \
    PLAYHEAD_API__CATALOG_PATH=config/catalog.toml PLAYHEAD_COALESCER__MAX_KEYS=2000000 \
    valgrind --tool=callgrind --callgrind-out-file="$OUT/callgrind.$label.%p" "$bin" serve \
    > "$OUT/server.$label.log" 2>&1 &
  SERVER=$!
  for _ in $(seq 1 600); do curl -sf "127.0.0.1:$HTTP_PORT/readyz" >/dev/null && break; sleep 0.5; done
  load $((KEYS / RATE + 5))
  sleep 2
  local r0 r1 dump ir
  r0=$(records)
  callgrind_control -z "$SERVER" > /dev/null
  load "$SECS"
  sleep 2
  callgrind_control -d "$SERVER" > /dev/null
  sleep 1
  r1=$(records)
  kill -TERM "$SERVER"; wait "$SERVER" || true; SERVER=
  dump=$(ls -t "$OUT"/callgrind."$label".*.1 | head -1)
  ir=$(awk '/^summary:/ {print $2; exit}' "$dump")
  python3 -c "r=int(float('$r1')-float('$r0')); print(f'$label\t$bin\trecords {r}\tinstructions {$ir}\tper record {$ir/r:.0f}')"
  rm -rf "$data"
}

read -r -a builds <<< "$BINS"
run=0
for round in $(seq 1 "$ROUNDS"); do
  # Alternate the order each round (a b, then b a) so a drift in the machine hits both.
  order=("${builds[@]}")
  if [ $((round % 2)) = 0 ]; then order=($(printf '%s\n' "${builds[@]}" | tac)); fi
  for bin in "${order[@]}"; do
    run=$((run + 1))
    one "$bin" "r$run"
  done
done
