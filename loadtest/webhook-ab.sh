#!/usr/bin/env bash
# What delivery to clients costs while a webhook receiver is down (issue 18): three server
# configurations alternated, ROUNDS rounds, one fresh server each (--shards 1 on CPU 0, load
# generator on CPU 1): base (no [[webhooks]]), refused (a hook whose URL refuses connections) and
# hanging (a receiver that accepts and never answers). Each runs the presence storm (two member
# events per cycle for the hook) and the 1,000-subscriber max-rate fan-out. Run from the
# repository root after `cargo build --release -p broadcaster -p loadtest`; results in $OUT.
set -euo pipefail
BIN=${BIN:-target/release/broadcaster}
LT=${LT:-target/release/broadcaster-loadtest}
OUT=${OUT:-webhook-ab}
ROUNDS=${ROUNDS:-3}
PORT=${PORT:-18400}
HANG_PORT=${HANG_PORT:-18499}
mkdir -p "$OUT"
export BROADCASTER_AUTH_JWT_SECRET=${BROADCASTER_AUTH_JWT_SECRET:-$(head -c 32 /dev/urandom | base64)}
export BROADCASTER_AUTH_API_KEYS=${BROADCASTER_AUTH_API_KEYS:-lt-key}
export BROADCASTER_LIMITS_ANONYMOUS_CONNECTIONS_PER_IP_MAX=1000000

rules='[[channels]]
pattern = "room/*"
presence = true
join_leave = true
'
printf '%s' "$rules" >"$OUT/base.toml"
printf '%s\n[[webhooks]]\nurl = "http://127.0.0.1:9/hooks"\nsecret = "s"\n' "$rules" >"$OUT/refused.toml"
printf '%s\n[[webhooks]]\nurl = "http://127.0.0.1:%s/hooks"\nsecret = "s"\n' "$rules" "$HANG_PORT" >"$OUT/hanging.toml"

# The hanging receiver: accepts every connection and never answers.
python3 -c "
import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(('127.0.0.1', $HANG_PORT)); s.listen(1024); held = []
while True: held.append(s.accept()[0])
" &
HANG=$!
trap 'kill $HANG 2>/dev/null || true' EXIT
sleep 0.3

for round in $(seq "$ROUNDS"); do
  for kind in base refused hanging; do
    taskset -c 0 "$BIN" serve --config "$OUT/$kind.toml" --listen "127.0.0.1:$PORT" --shards 1 >/dev/null 2>&1 &
    PID=$!
    sleep 0.7
    taskset -c 1 "$LT" presence --server "127.0.0.1:$PORT" --server-pid "$PID" --duration 8s --cpus 1 \
      --json "$OUT/p-$kind-$round.json" >"$OUT/p-$kind-$round.txt" 2>&1 || true
    taskset -c 1 "$LT" fanout --server "127.0.0.1:$PORT" -s 1000 --rate 0 --window 4 --pipeline 4 \
      --duration 8 --cpus 1 --server-pid "$PID" --json "$OUT/f-$kind-$round.json" >"$OUT/f-$kind-$round.txt" 2>&1 || true
    curl -s "127.0.0.1:$PORT/metrics" | grep -E '^webhook_' >"$OUT/m-$kind-$round.txt" || true
    kill "$PID"; wait "$PID" 2>/dev/null || true
  done
done
for kind in base refused hanging; do
  for round in $(seq "$ROUNDS"); do
    echo "$kind $round: $(grep 'server CPU per join' "$OUT/p-$kind-$round.txt" | tr -s ' ') |" \
      "$(grep 'CPU per delivered message' "$OUT/f-$kind-$round.txt" | tr -s ' ') |" \
      "$(grep 'deliveries/s' "$OUT/f-$kind-$round.txt" | tr -s ' ')"
  done
done
