#!/usr/bin/env bash
# Side-by-side comparison of Playhead with its peers, in one run on this machine:
#   1. ingest   playhead-loadgen `max` against Playhead (binary protocol), Redis doing the
#               same last-write-wins upsert (EVALSHA, same pipelining depth) and Redis plain
#               SET (no semantics, the ceiling). Same client, same keys.
#   2. http     wrk POST /api/v1/stream/progress with a valid JWT against Playhead vs nginx
#               answering a bare `return 204` (one worker each, same wrk settings;
#               alternated twice, averaged).
#   3. read     resume reads at a fixed rate (p99) and at max: Playhead HTTP GET vs Redis GET;
#               nginx answering the same GETs with a bare 204 gives the generator's p99 floor.
#   4. amplification  `fleet` (4 s heartbeats) at flush intervals 1 s, 5 s, 30 s:
#               heartbeats received / rows written to the store.
#
# Usage: bench/compare.sh [--quick] [section ...]     (default: every section)
# Writes target/compare/results.json and prints one table. Installs redis-server,
# nginx-light and wrk from Debian's packages when they are missing. Everything listens on
# 127.0.0.1 and is stopped at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

QUICK=0
SECTIONS=()
for arg in "$@"; do
  case "$arg" in
    --quick) QUICK=1 ;;
    ingest|http|read|amplification) SECTIONS+=("$arg") ;;
    *) echo "usage: $0 [--quick] [ingest|http|read|amplification ...]" >&2; exit 2 ;;
  esac
done
[ ${#SECTIONS[@]} -eq 0 ] && SECTIONS=(ingest http read amplification)

# Fixed thread counts (2-core machine): the server gets one runtime worker (plus its
# commit-log thread), the load generator one thread, nginx one worker, wrk one thread;
# Redis is single-threaded.
SERVER_THREADS=${SERVER_THREADS:-1}
LOADGEN_THREADS=${LOADGEN_THREADS:-1}
DURATION=${DURATION:-10}
WARMUP=${WARMUP:-2}
KEYS=${KEYS:-1000000}
if [ "$QUICK" = 1 ]; then DURATION=3; WARMUP=1; KEYS=200000; fi

need() { command -v "$1" >/dev/null 2>&1; }
if ! need redis-server || ! need nginx || ! need wrk; then
  echo "installing redis-server nginx-light wrk (Debian packages)" >&2
  export DEBIAN_FRONTEND=noninteractive
  SUDO=""; [ "$(id -u)" != 0 ] && SUDO=sudo
  $SUDO apt-get install -y -q redis-server nginx-light wrk >/dev/null 2>&1 \
    || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q redis-server nginx-light wrk >/dev/null; }
fi

cargo build --release -q -p playhead -p playhead-loadgen
TARGET_DIR=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
PLAYHEAD="$TARGET_DIR/release/playhead"
LOADGEN="$TARGET_DIR/release/playhead-loadgen"
OUT="$TARGET_DIR/compare"
WORK=$(mktemp -d /tmp/playhead-compare.XXXXXX)
mkdir -p "$OUT"
RESULTS="$OUT/results.jsonl"
: > "$RESULTS"

HTTP_PORT=18080; BINARY_PORT=17070; NGINX_PORT=18081; REDIS_PORT=16379
PIDS=()
cleanup() {
  for pid in "${PIDS[@]:-}"; do [ -n "$pid" ] && kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

start_playhead() { # extra env assignments as arguments
  local data="$WORK/playhead-data-$RANDOM"
  env PLAYHEAD_SERVER__DATA_DIR="$data" PLAYHEAD_SERVER__WORKER_THREADS="$SERVER_THREADS" \
      PLAYHEAD_HTTP__LISTEN="127.0.0.1:$HTTP_PORT" PLAYHEAD_BINARY__LISTEN="127.0.0.1:$BINARY_PORT" \
      RUST_LOG=warn "$@" "$PLAYHEAD" serve > "$WORK/playhead.log" 2>&1 &
  PLAYHEAD_PID=$!
  PIDS+=("$PLAYHEAD_PID")
  for _ in $(seq 100); do curl -sf "127.0.0.1:$HTTP_PORT/healthz" >/dev/null 2>&1 && return; sleep 0.1; done
  echo "playhead did not start:" >&2; cat "$WORK/playhead.log" >&2; exit 1
}
stop_playhead() { kill -TERM "$PLAYHEAD_PID" 2>/dev/null || true; wait "$PLAYHEAD_PID" 2>/dev/null || true; }

start_redis() {
  local dir="$WORK/redis-$RANDOM"
  mkdir -p "$dir"
  redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly yes --appendfsync everysec \
    --dir "$dir" --daemonize no > "$WORK/redis.log" 2>&1 &
  REDIS_PID=$!; PIDS+=("$REDIS_PID")
  for _ in $(seq 100); do [ "$(redis-cli -p "$REDIS_PORT" ping 2>/dev/null)" = PONG ] && return; sleep 0.1; done
  echo "redis did not start" >&2; exit 1
}
stop_redis() { kill "$REDIS_PID" 2>/dev/null || true; wait "$REDIS_PID" 2>/dev/null || true; }

start_nginx() {
  mkdir -p "$WORK/nginx"
  sed -e "s#NGINX_DIR#$WORK/nginx#g" -e "s#NGINX_PORT#$NGINX_PORT#" bench/nginx.conf > "$WORK/nginx/nginx.conf"
  nginx -c "$WORK/nginx/nginx.conf" -p "$WORK/nginx" > "$WORK/nginx/out.log" 2>&1 &
  NGINX_PID=$!; PIDS+=("$NGINX_PID")
  for _ in $(seq 50); do curl -s -o /dev/null "127.0.0.1:$NGINX_PORT/" && return; sleep 0.1; done
  echo "nginx did not start" >&2; exit 1
}
stop_nginx() { kill -QUIT "$NGINX_PID" 2>/dev/null || true; wait "$NGINX_PID" 2>/dev/null || true; }

# record SECTION TARGET METRIC VALUE UNIT NOTE
record() {
  python3 - "$@" >> "$RESULTS" <<'PY'
import json, sys, datetime, os
section, target, metric, value, unit, note = sys.argv[1:7]
print(json.dumps({"section": section, "target": target, "metric": metric, "value": float(value),
  "unit": unit, "note": note, "cores": os.cpu_count(),
  "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}))
PY
}

loadgen() { # runs the load generator, prints the JSON report path
  local report="$WORK/report-$RANDOM.json"
  "$LOADGEN" "$@" --threads "$LOADGEN_THREADS" --duration-secs "$DURATION" --warmup-secs "$WARMUP" \
    --binary-addr "127.0.0.1:$BINARY_PORT" --http-addr "127.0.0.1:${LOADGEN_HTTP_PORT:-$HTTP_PORT}" \
    --redis-addr "127.0.0.1:$REDIS_PORT" --quiet --json "$report" > "$WORK/loadgen.out" 2>&1 \
    || { cat "$WORK/loadgen.out" >&2; exit 1; }
  echo "$report"
}
field() { python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(eval(sys.argv[2], {}, {'r': r}))" "$1" "$2"; }

THREADS_NOTE="server ${SERVER_THREADS} worker (+log thread), loadgen ${LOADGEN_THREADS} thread"

# The ingest workload, the same for every target.
INGEST_ARGS=(max --keys "$KEYS" --connections 4 --batch 1024 --in-flight 16)

# ingest_round ROUND: one `max` run against each target (a fresh server each time);
# records each run's figures and adds its rate to INGEST_SUM.
ingest_round() {
  local round=$1 r target
  start_playhead
  r=$(loadgen "${INGEST_ARGS[@]}" --protocol binary)
  ingest_record playhead "$round" "$r"
  stop_playhead
  start_redis
  for target in redis-lww redis-set; do
    r=$(loadgen "${INGEST_ARGS[@]}" --protocol "$target")
    ingest_record "$target" "$round" "$r"
    redis-cli -p "$REDIS_PORT" flushall >/dev/null
  done
  stop_redis
}
ingest_record() { # TARGET ROUND REPORT
  local rate; rate=$(field "$3" "r['acked_per_sec']")
  record ingest "$1" "acked_per_sec_round_$2" "$rate" "heartbeats/s" "one run"
  record ingest "$1" "p99_batch_ms_round_$2" "$(field "$3" "r['latency']['p99']")" ms "per 1024-record batch"
  INGEST_SUM[$1]=$(python3 -c "print(${INGEST_SUM[$1]} + $rate)")
}

section_ingest() {
  # Alternated twice (Playhead, Redis LWW, Redis SET, then again) and averaged, like the
  # HTTP pair: on this shared machine one round has moved a ratio by 10 % (BENCHMARKS.md).
  declare -gA INGEST_SUM=([playhead]=0 [redis-lww]=0 [redis-set]=0)
  ingest_round 1
  ingest_round 2
  local -A what=(
    [playhead]="binary, periodic fsync; $THREADS_NOTE"
    [redis-lww]="EVALSHA LWW script, appendfsync everysec, pipelined 1024 x 16"
    [redis-set]="plain SET, appendfsync everysec, pipelined 1024 x 16"
  )
  local target
  for target in playhead redis-lww redis-set; do
    record ingest "$target" acked_per_sec "$(python3 -c "print(${INGEST_SUM[$target]} / 2)")" \
      "heartbeats/s" "mean of 2 alternated runs; ${what[$target]}"
  done
  # The same at a 5 s flush interval (one run): `max` rewrites every key several times a
  # second, and a longer cadence writes each key once for more heartbeats (the embedded
  # store's reads see unflushed values, so it costs replay time, not staleness). With
  # background work at low priority the flush already stretches its cycles under load, so
  # the two are close (BENCHMARKS.md).
  start_playhead PLAYHEAD_FLUSH__INTERVAL_MS=5000
  local r; r=$(loadgen "${INGEST_ARGS[@]}" --protocol binary)
  record ingest playhead-flush-5s acked_per_sec "$(field "$r" "r['acked_per_sec']")" "heartbeats/s" "one run, flush.interval_ms = 5000"
  record ingest playhead-flush-5s p99_batch_ms "$(field "$r" "r['latency']['p99']")" ms "per 1024-record batch"
  stop_playhead
}

section_http() {
  start_playhead
  start_nginx
  local token; token=$("$PLAYHEAD" token --account-id 1 --profile-id 1)
  # Alternated twice (Playhead, nginx, Playhead, nginx) and averaged: on this shared
  # machine one pair of runs has swung the ratio between 0.71 and 0.88.
  local -A sum=([playhead]=0 [nginx]=0)
  local rps round target
  for round in 1 2; do
    for target in playhead nginx; do
      local port=$HTTP_PORT; [ "$target" = nginx ] && port=$NGINX_PORT
      TOKEN="$token" wrk -t1 -c64 -d"${DURATION}s" -s bench/post_progress.lua "http://127.0.0.1:$port" > "$WORK/wrk.out" 2>&1
      if grep -q "Non-2xx" "$WORK/wrk.out"; then echo "wrk saw errors from $target:" >&2; cat "$WORK/wrk.out" >&2; exit 1; fi
      rps=$(awk '/Requests\/sec/ {print $2}' "$WORK/wrk.out")
      record http "$target" "requests_per_sec_round_$round" "$rps" "req/s" "one run"
      sum[$target]=$(python3 -c "print(${sum[$target]} + $rps)")
    done
  done
  for target in playhead nginx; do
    record http "$target" requests_per_sec "$(python3 -c "print(${sum[$target]} / 2)")" "req/s" \
      "mean of 2 alternated runs; wrk -t1 -c64 POST progress with JWT; one worker each"
  done
  stop_nginx
  stop_playhead
}

section_read() {
  start_playhead
  # Positions to read back: write every key once first.
  loadgen max --protocol binary --keys 100000 --connections 2 > /dev/null
  local r
  r=$(loadgen read --protocol http --keys 100000 --connections 64 --rate 50000)
  record read playhead p99_at_50k_ms "$(field "$r" "r['latency']['p99']")" ms "HTTP GET resume, open loop 50 k/s, 64 connections"
  record read playhead achieved_at_50k "$(field "$r" "r['acked_per_sec']")" "req/s" "rate actually served"
  r=$(loadgen read --protocol http --keys 100000 --connections 64)
  record read playhead max_per_sec "$(field "$r" "r['acked_per_sec']")" "req/s" "HTTP GET resume, closed loop, 64 connections"
  record read playhead p99_at_max_ms "$(field "$r" "r['latency']['p99']")" ms ""
  # The same read with wrk (a C client, lighter than playhead-loadgen's HTTP client): the
  # server's own ceiling when the generator is not the bottleneck.
  local token; token=$("$PLAYHEAD" token --account-id 1 --profile-id 1)
  TOKEN="$token" wrk -t1 -c64 -d"${DURATION}s" -s bench/get_stream.lua "http://127.0.0.1:$HTTP_PORT" > "$WORK/wrk.out" 2>&1
  record read playhead wrk_max_per_sec "$(awk '/Requests\/sec/ {print $2}' "$WORK/wrk.out")" "req/s" "wrk -t1 -c64 GET resume"
  stop_playhead
  # At 50 k/s one runtime worker is ~90 % busy (a GET costs ~18-23 us of server CPU here,
  # half of it loopback TCP), so the fixed rate again with two: the server may then use
  # the core the generator leaves.
  start_playhead PLAYHEAD_SERVER__WORKER_THREADS=2
  loadgen max --protocol binary --keys 100000 --connections 2 > /dev/null
  r=$(loadgen read --protocol http --keys 100000 --connections 64 --rate 50000)
  record read playhead-2-workers p99_at_50k_ms "$(field "$r" "r['latency']['p99']")" ms "as p99_at_50k_ms, server with 2 runtime workers"
  stop_playhead
  start_redis
  loadgen max --protocol redis-set --keys 100000 --connections 2 > /dev/null
  r=$(loadgen read --protocol redis-set --keys 100000 --connections 64 --batch 1 --in-flight 1 --rate 50000)
  record read redis p99_at_50k_ms "$(field "$r" "r['latency']['p99']")" ms "GET, open loop 50 k/s, 64 connections, no pipelining"
  record read redis achieved_at_50k "$(field "$r" "r['acked_per_sec']")" "req/s" ""
  r=$(loadgen read --protocol redis-set --keys 100000 --connections 64 --batch 1 --in-flight 1)
  record read redis max_per_sec "$(field "$r" "r['acked_per_sec']")" "req/s" "GET, closed loop, 64 connections"
  record read redis p99_at_max_ms "$(field "$r" "r['latency']['p99']")" ms ""
  stop_redis
  # The floor of this measurement: the same generator at the same rate against nginx
  # answering every GET with a bare 204 (no work at all behind it). Whatever p99 nginx
  # gets here is the client's and the machine's share of every p99 above.
  start_nginx
  r=$(LOADGEN_HTTP_PORT=$NGINX_PORT loadgen read --protocol http --keys 100000 --connections 64 --rate 50000)
  record read nginx-204 p99_at_50k_ms "$(field "$r" "r['latency']['p99']")" ms "the generator's floor: same GETs, open loop 50 k/s, nginx return 204"
  record read nginx-204 achieved_at_50k "$(field "$r" "r['acked_per_sec']")" "req/s" ""
  stop_nginx
}

section_amplification() {
  local viewers=100000 run=40
  [ "$QUICK" = 1 ] && { viewers=20000; run=12; }
  for interval in 1000 5000 30000; do
    start_playhead PLAYHEAD_FLUSH__INTERVAL_MS="$interval"
    "$LOADGEN" fleet --viewers "$viewers" --connections 2 --threads "$LOADGEN_THREADS" \
      --duration-secs "$run" --warmup-secs 0 --binary-addr "127.0.0.1:$BINARY_PORT" \
      --http-addr "127.0.0.1:$HTTP_PORT" --quiet > "$WORK/fleet.out" 2>&1
    curl -s "127.0.0.1:$HTTP_PORT/metrics" > "$WORK/metrics.txt"
    python3 - "$WORK/metrics.txt" "$interval" "$run" >> "$WORK/amp.txt" <<'PY'
import sys, re
text = open(sys.argv[1]).read()
def metric(name, labels=""):
    m = re.search(r"^" + re.escape(name + labels) + r" (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0
accepted = metric("playhead_heartbeats_accepted_total", '{protocol="binary"}')
rows = metric("playhead_flush_rows_total")
in_memory = metric("playhead_coalescer_keys", '{state="dirty"}') + metric("playhead_coalescer_keys", '{state="flushing"}')
print(sys.argv[2], accepted, rows, in_memory, sys.argv[3])
PY
    stop_playhead
  done
  while read -r interval accepted rows in_memory run; do
    local written; written=$(python3 -c "print($rows + $in_memory)")
    record amplification "playhead flush ${interval} ms" heartbeats_per_row \
      "$(python3 -c "print($accepted / max($written, 1))")" "ratio" \
      "fleet $viewers viewers, ${run} s: $accepted heartbeats, $rows rows flushed + $in_memory keys awaiting flush"
  done < "$WORK/amp.txt"
}

for s in "${SECTIONS[@]}"; do
  echo "== $s" >&2
  "section_$s"
done

python3 - "$RESULTS" "$OUT/results.json" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
def get(section, target, metric):
    for r in rows:
        if (r["section"], r["target"], r["metric"]) == (section, target, metric):
            return r["value"]
ratios = []
for section, metric, ours, peer in [("ingest", "acked_per_sec", "playhead", "redis-lww"),
                                    ("ingest", "acked_per_sec", "playhead", "redis-set"),
                                    ("ingest", "acked_per_sec", "playhead-flush-5s", "redis-lww"),
                                    ("ingest", "acked_per_sec", "playhead-flush-5s", "redis-set"),
                                    ("http", "requests_per_sec", "playhead", "nginx"),
                                    ("read", "max_per_sec", "playhead", "redis")]:
    a, b = get(section, ours, metric), get(section, peer, metric)
    if a is not None and b:
        ratios.append({"section": section, "metric": metric, "target": ours, "peer": peer,
                       "playhead": a, "peer_value": b, "ratio": a / b})
json.dump({"results": rows, "ratios": ratios}, open(sys.argv[2], "w"), indent=2)
print(f"{'section':<14} {'target':<26} {'metric':<20} {'value':>14}  unit")
for r in rows:
    print(f"{r['section']:<14} {r['target']:<26} {r['metric']:<20} {r['value']:>14.3f}  {r['unit']}")
print()
for r in ratios:
    print(f"{r['target'] + ' / ' + r['peer']:<32} {r['section']:<8} {r['metric']:<18} {r['ratio']:8.2f}x")
if rows:
    print(f"\n{rows[0]['cores']} cores, {rows[0]['date']}; results in {sys.argv[2]}")
PY
