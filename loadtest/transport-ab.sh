#!/usr/bin/env bash
# One fan-out measured over different subscriber transports (issue 19), alternated for ROUNDS
# rounds, one fresh server each (--shards 1 on CPU 0, load generator on CPU 1), SUBSCRIBERS
# subscribers of one channel, RATE publications/s of PAYLOAD_BYTES for DURATION s. MODES picks
# the transports: plain (WebSocket), compress (WebSocket offering permessage-deflate), sse
# (server-sent events). Prints per run the broadcast bytes on the wire per delivery, the server
# CPU per delivered message and the latency p99. Run from the repository root after
# `cargo build --release -p broadcaster -p loadtest`; the full reports are in $OUT.
#
#   # a 64 kB JSON scoreboard with and without compression
#   MODES="plain compress" PAYLOAD_BYTES=64000 PAYLOAD_SHAPE=scoreboard RATE=2 loadtest/transport-ab.sh
#   # SSE against WebSocket, 64-byte payloads
#   MODES="plain sse" PAYLOAD_BYTES=64 RATE=50 loadtest/transport-ab.sh
set -euo pipefail
BIN=${BIN:-target/release/broadcaster}
LT=${LT:-target/release/broadcaster-loadtest}
OUT=${OUT:-transport-ab}
ROUNDS=${ROUNDS:-3}
MODES=${MODES:-plain compress}
PAYLOAD_BYTES=${PAYLOAD_BYTES:-64000}
PAYLOAD_SHAPE=${PAYLOAD_SHAPE:-scoreboard}
RATE=${RATE:-2}
DURATION=${DURATION:-20}
SUBSCRIBERS=${SUBSCRIBERS:-1000}
PORT=${PORT:-18300}
mkdir -p "$OUT"
export BROADCASTER_AUTH_JWT_SECRET=${BROADCASTER_AUTH_JWT_SECRET:-$(head -c 32 /dev/urandom | base64)}
export BROADCASTER_AUTH_API_KEYS=${BROADCASTER_AUTH_API_KEYS:-lt-key}
export BROADCASTER_LIMITS_ANONYMOUS_CONNECTIONS_PER_IP_MAX=1000000

printf '%-6s %-9s %12s %14s %10s\n' round mode frame_bytes server_us p99_ms
for round in $(seq "$ROUNDS"); do
  for mode in $MODES; do
    flag=()
    [ "$mode" = compress ] && flag=(--compress)
    [ "$mode" = sse ] && flag=(--sse)
    taskset -c 0 "$BIN" serve --listen "127.0.0.1:$PORT" --shards 1 >/dev/null 2>&1 &
    PID=$!
    sleep 0.7
    report="$OUT/$mode-$round.txt"
    taskset -c 1 "$LT" fanout --server "127.0.0.1:$PORT" -s "$SUBSCRIBERS" --rate "$RATE" \
      --duration "$DURATION" --payload-bytes "$PAYLOAD_BYTES" --payload-shape "$PAYLOAD_SHAPE" "${flag[@]}" \
      --cpus 1 --server-pid "$PID" --quiet >"$report" 2>&1 || true
    curl -s "127.0.0.1:$PORT/metrics" | grep -E '^compression_bytes' >>"$report" || true
    kill "$PID"; wait "$PID" 2>/dev/null || true
    bytes=$(awk '/broadcast frame bytes/ {print $NF}' "$report")
    cpu=$(awk '/CPU per delivered message/ {print $6}' "$report")
    p99=$(awk '/latency ms/ {for (i = 1; i <= NF; i++) if ($i == "p99") print $(i + 1)}' "$report")
    printf '%-6s %-9s %12s %14s %10s\n' "$round" "$mode" "$bytes" "$cpu" "$p99"
  done
done
