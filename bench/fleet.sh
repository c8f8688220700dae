#!/usr/bin/env bash
# The fleet ladder: Playhead at the real traffic shape (every viewer one heartbeat every 4 s,
# each heartbeat a different key within any interval shorter than that), one rung per
# viewer count, and a Redis LWW peer row through the same generator.
#
#   bash bench/fleet.sh                       # 1 M, 4 M, 10 M, 30 M viewers, 60 s each
#   VIEWERS="10000000" DURATION=300 bash bench/fleet.sh
#   MODE=group bash bench/fleet.sh            # group commit instead of periodic fsync
#   PEER=0 bash bench/fleet.sh                # skip the Redis row
#   BIN=/tmp/playhead-a OUT=target/fleet-a VIEWERS=10000000 PEER=0 bash bench/fleet.sh
#                                             # another server build, results kept apart
#
# Server: PLAYHEAD_SERVER__WORKER_THREADS=${SERVER_THREADS:-2} (the server's own default on
# this 2-core machine; with 1 worker the 10 M rung's p99 was 134-1 746 ms against 44-125 ms
# with 2, BENCHMARKS.md, "The 10 M tail, third look"), otherwise its defaults, data under a
# fresh temp dir on the work disk. Generator: --threads ${LOADGEN_THREADS:-1}.
# Each rung prints: due (heartbeats scheduled in the measured window, pauses excluded),
# acknowledged among them, ratio, batch p50/p99, keys in memory (dirty+clean) at 1/4, 1/2
# and the end of the run, store rows/s, log MB/s written, RSS (and bytes per key held, with
# what the key table and the alternatives' table allocated, from /metrics), CPU seconds per
# component over the measured window, and the SIGTERM drain time.
# Results: target/fleet/results.jsonl (one JSON object per rung).
# Needs: release binaries (built here), python3; redis-server for the peer row (installed
# from Debian if missing and apt-get is available).
set -euo pipefail
cd "$(dirname "$0")/.."

VIEWERS=${VIEWERS:-"1000000 4000000 10000000 30000000"}
DURATION=${DURATION:-60}
WARMUP=${WARMUP:-15}
CONNECTIONS=${CONNECTIONS:-8}
SERVER_THREADS=${SERVER_THREADS:-2}
LOADGEN_THREADS=${LOADGEN_THREADS:-1}
MODE=${MODE:-periodic}
PEER=${PEER:-1}
PEER_VIEWERS=${PEER_VIEWERS:-"1000000"}
OUT=${OUT:-target/fleet}
mkdir -p "$OUT"
RESULTS="$OUT/results.jsonl"
: > "$RESULTS"

# BIN (and LOADGEN) may name other builds, e.g. for an A/B of two commits alternated.
if [ -z "${BIN:-}" ]; then cargo build --release -q -p playhead -p playhead-loadgen; fi
BIN=${BIN:-target/release/playhead}
LOADGEN=${LOADGEN:-target/release/playhead-loadgen}
HTTP_PORT=${HTTP_PORT:-18080}
BIN_PORT=${BIN_PORT:-17070}
REDIS_PORT=${REDIS_PORT:-16379}

# CPU seconds (utime+stime) of every thread of $1, summed by thread name.
thread_cpu() {
  python3 - "$1" <<'PY'
import os, sys, json
pid, tck = sys.argv[1], os.sysconf("SC_CLK_TCK")
out = {}
for tid in os.listdir(f"/proc/{pid}/task"):
    try:
        stat = open(f"/proc/{pid}/task/{tid}/stat").read()
    except OSError:
        continue
    name = stat[stat.index("(") + 1:stat.rindex(")")]
    fields = stat[stat.rindex(")") + 2:].split()
    secs = (int(fields[11]) + int(fields[12])) / tck
    # Group numbered threads: tokio-runtime-w, fjall workers, playhead-bg, ...
    key = name.rstrip("0123456789-_ ")
    out[key] = out.get(key, 0.0) + secs
print(json.dumps(out))
PY
}

proc_cpu() {
  python3 -c "import os,sys; f=open('/proc/$1/stat').read(); s=f[f.rindex(')')+2:].split(); print((int(s[11])+int(s[12]))/os.sysconf('SC_CLK_TCK'))"
}

metrics() { curl -s "127.0.0.1:$HTTP_PORT/metrics"; }

sample() {
  # keys held, flush rows, wal written bytes, alternatives held, bytes the key table and the
  # alternatives' table allocated (0 for builds without them)
  metrics | python3 -c '
import sys
m = {}
for line in sys.stdin:
    if line.startswith("#") or not line.strip(): continue
    name, value = line.rsplit(" ", 1)
    m[name] = float(value)
keys = sum(v for k, v in m.items() if k.startswith("playhead_coalescer_keys{") and "flushing" not in k)
print(int(keys), int(m.get("playhead_flush_rows_total", 0)), int(m.get("playhead_wal_written_bytes_total", 0)),
      int(m.get("playhead_coalescer_alternatives", 0)),
      int(m.get("playhead_coalescer_allocated_bytes{table=\"keys\"}", 0)),
      int(m.get("playhead_coalescer_allocated_bytes{table=\"alternatives\"}", 0)))'
}

rss_kb() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }

# Whatever happens, leave no server or generator behind.
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

run_rung() {
  local viewers=$1
  local data
  data=$(mktemp -d -p "${TMPDIR:-/tmp}" playhead-fleet.XXXXXX)
  PLAYHEAD_SERVER__WORKER_THREADS=$SERVER_THREADS PLAYHEAD_SERVER__DATA_DIR="$data" \
    PLAYHEAD_WAL__SYNC_MODE=$MODE PLAYHEAD_HTTP__LISTEN=127.0.0.1:$HTTP_PORT \
    PLAYHEAD_BINARY__LISTEN=127.0.0.1:$BIN_PORT PLAYHEAD_API__CATALOG_PATH=config/catalog.toml \
    "$BIN" serve > "$OUT/server-$viewers.log" 2>&1 &
  local server=$!
  PIDS+=("$server")
  for _ in $(seq 1 100); do curl -sf "127.0.0.1:$HTTP_PORT/readyz" >/dev/null && break; sleep 0.1; done
  "$LOADGEN" fleet --viewers "$viewers" --connections "$CONNECTIONS" --threads "$LOADGEN_THREADS" \
    --duration-secs "$DURATION" --warmup-secs "$WARMUP" --verify --quiet \
    --binary-addr 127.0.0.1:$BIN_PORT --http-addr 127.0.0.1:$HTTP_PORT \
    --json "$OUT/loadgen-$viewers.json" > "$OUT/loadgen-$viewers.txt" 2>&1 &
  local gen=$!
  PIDS+=("$gen")
  sleep "$WARMUP"
  kill -0 $gen 2>/dev/null || { echo "the generator exited early:" >&2; tail -5 "$OUT/loadgen-$viewers.txt" >&2; exit 1; }
  local cpu0 gen0 s0 t0
  cpu0=$(thread_cpu $server); gen0=$(proc_cpu $gen); s0=$(sample); t0=$(date +%s.%N)
  sleep $((DURATION / 4)); local q1; q1=$(sample)
  sleep $((DURATION / 4)); local q2; q2=$(sample)
  sleep $((DURATION / 2 - 4)); local s1 rss cpu1 gen1 t1
  s1=$(sample); rss=$(rss_kb $server); cpu1=$(thread_cpu $server); gen1=$(proc_cpu $gen); t1=$(date +%s.%N)
  local status=0
  wait $gen || status=$?
  local drain0 drain
  drain0=$(date +%s.%N)
  kill -TERM $server
  wait $server || true
  drain=$(python3 -c "print(round($(date +%s.%N) - $drain0, 2))")
  python3 - "$viewers" "$OUT/loadgen-$viewers.json" "$s0" "$q1" "$q2" "$s1" "$rss" "$cpu0" "$cpu1" \
      "$gen0" "$gen1" "$t0" "$t1" "$drain" "$status" "$MODE" >> "$RESULTS" <<'PY'
import json, sys
(viewers, path, s0, q1, q2, s1, rss, cpu0, cpu1, gen0, gen1, t0, t1, drain, status, mode) = sys.argv[1:]
r = json.load(open(path))
s0, q1, q2, s1 = ([int(x) for x in s.split()] for s in (s0, q1, q2, s1))
secs = float(t1) - float(t0)
cpu0, cpu1 = json.loads(cpu0), json.loads(cpu1)
cpu = {k: round(cpu1.get(k, 0) - cpu0.get(k, 0), 1) for k in cpu1 if cpu1.get(k, 0) - cpu0.get(k, 0) >= 0.1}
v = r.get("verification") or {}
print(json.dumps({
    "target": "playhead", "mode": mode, "viewers": int(viewers),
    "due": r["due"], "due_acked": r["due_acked"], "ratio": round(r["due_acked_ratio"], 4),
    "acked_per_sec": round(r["acked_per_sec"]), "busy": r["busy"],
    "p50_ms": r["latency"]["p50"], "p99_ms": r["latency"]["p99"], "samples": r["latency"]["samples"],
    "keys_start": s0[0], "keys_mid": q2[0], "keys_q1": q1[0], "keys_end": s1[0],
    "alternatives_end": s1[3],
    "store_rows_per_sec": round((s1[1] - s0[1]) / secs), "log_mb_per_sec": round((s1[2] - s0[2]) / secs / 1e6, 1),
    "rss_mb": round(int(rss) / 1024), "rss_bytes_per_key": round(int(rss) * 1024 / max(s1[0], 1), 1),
    "keys_table_mb": round(s1[4] / 2**20), "alternatives_table_mb": round(s1[5] / 2**20),
    "server_cpu_s": cpu, "server_cpu_total_s": round(sum(cpu.values()), 1),
    "loadgen_cpu_s": round(float(gen1) - float(gen0), 1), "window_s": round(secs, 1),
    "drain_s": float(drain), "verify_checked": v.get("checked"), "verify_mismatches": v.get("mismatches"),
    "verify_degraded_then_right": v.get("degraded_then_right"),
    "loadgen_exit": int(status),
}))
PY
  rm -rf "$data"
}

run_peer() {
  local viewers=$1
  if ! command -v redis-server >/dev/null; then
    if command -v apt-get >/dev/null; then
      echo "installing redis-server (Debian package) for the peer row" >&2
      apt-get install -y -q redis-server >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q redis-server >/dev/null; }
    fi
  fi
  command -v redis-server >/dev/null || { echo "no redis-server: peer row skipped" >&2; return; }
  local data; data=$(mktemp -d)
  redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly yes --appendfsync everysec \
    --dir "$data" --daemonize no > "$OUT/redis.log" 2>&1 &
  local redis=$!
  PIDS+=("$redis")
  sleep 1
  "$LOADGEN" fleet --protocol redis-lww --viewers "$viewers" --connections "$CONNECTIONS" \
    --threads "$LOADGEN_THREADS" --duration-secs "$DURATION" --warmup-secs "$WARMUP" --quiet \
    --redis-addr 127.0.0.1:$REDIS_PORT --json "$OUT/redis-$viewers.json" > "$OUT/redis-$viewers.txt" 2>&1 || true
  kill $redis; wait $redis || true
  rm -rf "$data"
  python3 - "$viewers" "$OUT/redis-$viewers.json" >> "$RESULTS" <<'PY'
import json, sys
r = json.load(open(sys.argv[2]))
print(json.dumps({"target": "redis-lww", "mode": "appendfsync everysec", "viewers": int(sys.argv[1]),
    "due": r["due"], "due_acked": r["due_acked"], "ratio": round(r["due_acked_ratio"], 4),
    "acked_per_sec": round(r["acked_per_sec"]), "p50_ms": r["latency"]["p50"], "p99_ms": r["latency"]["p99"]}))
PY
}

for v in $VIEWERS; do
  echo "fleet: $v viewers ($MODE, ${DURATION}s + ${WARMUP}s warm-up)" >&2
  run_rung "$v"
done
if [ "$PEER" = 1 ]; then
  for v in $PEER_VIEWERS; do
    echo "fleet: redis-lww peer at $v viewers" >&2
    run_peer "$v"
  done
fi

python3 - "$RESULTS" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
print(f"{'target':<10} {'mode':<9} {'viewers':>9} {'due':>11} {'ratio':>7} {'ack/s':>10} {'p50ms':>7} {'p99ms':>8} "
      f"{'keys q1/mid/end (M)':>20} {'rows/s':>8} {'logMB/s':>7} {'RSS MB':>7} {'B/key':>6} {'srvCPU':>6} {'genCPU':>6} {'drain':>6} verify")
for r in rows:
    keys = "/".join(f"{r[k]/1e6:.1f}" for k in ("keys_q1", "keys_mid", "keys_end")) if "keys_end" in r else "-"
    ver = f"{r.get('verify_checked')} ok" if r.get("verify_mismatches") == 0 else str(r.get("verify_mismatches", "-"))
    print(f"{r['target']:<10} {r['mode'][:9]:<9} {r['viewers']:>9} {r['due']:>11} {r['ratio']:>7.4f} {r['acked_per_sec']:>10} "
          f"{r['p50_ms']:>7.2f} {r['p99_ms']:>8.2f} {keys:>20} {r.get('store_rows_per_sec', '-'):>8} "
          f"{r.get('log_mb_per_sec', '-'):>7} {r.get('rss_mb', '-'):>7} {r.get('rss_bytes_per_key', '-'):>6} "
          f"{r.get('server_cpu_total_s', '-'):>6} {r.get('loadgen_cpu_s', '-'):>6} {r.get('drain_s', '-'):>6} {ver}")
for r in rows:
    if "server_cpu_s" in r:
        print(f"  {r['viewers']} viewers, server CPU s over {r['window_s']} s by thread: {r['server_cpu_s']}")
    if "keys_table_mb" in r:
        rest = r["rss_mb"] - r["keys_table_mb"] - r["alternatives_table_mb"]
        print(f"  {r['viewers']} viewers, RSS {r['rss_mb']} MB: key table {r['keys_table_mb']}, "
              f"alternatives {r['alternatives_table_mb']} ({r['alternatives_end']} entries), the rest {rest}")
PY
