#!/usr/bin/env bash
# Cluster fan-out benchmark (issue 8): one channel with S subscribers spread over two nodes that share
# one Redis, against the same load on one node (one shard, then as many shards as the two nodes
# have together). Run from the repository root after
#     cargo build --release --bin broadcaster -p loadtest
# Environment: S (subscribers, 10000), RATE (msg/s, 10; 0 = max rate with WINDOW publications in
# flight), WINDOW (4), DUR (seconds, 20), OUT (output folder, cluster-bench), BIN and LT (binaries,
# target/release/...), REDIS_PORT (16379), BASE_PORT (18100), PUBLISH_ALL (1: publish round robin to
# both nodes), EXTRA (more load generator options).
set -euo pipefail

BIN=${BIN:-target/release/broadcaster}
LT=${LT:-target/release/broadcaster-loadtest}
S=${S:-10000}
RATE=${RATE:-10}
WINDOW=${WINDOW:-4}
DUR=${DUR:-20}
OUT=${OUT:-cluster-bench}
REDIS_PORT=${REDIS_PORT:-16379}
BASE=${BASE_PORT:-18100}
EXTRA=${EXTRA:-}
export BROADCASTER_AUTH_JWT_SECRET=${BROADCASTER_AUTH_JWT_SECRET:-$(head -c 32 /dev/urandom | base64)}
export BROADCASTER_AUTH_API_KEYS=${BROADCASTER_AUTH_API_KEYS:-lt-key}
mkdir -p "$OUT"

PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap cleanup EXIT

# start_node PORT SHARDS [REDIS_URL]: starts a node, waits for its `listening` line, sets NODE_PID.
start_node() {
    local port=$1 shards=$2 redis=${3:-}
    local log="$OUT/node-$port.log"
    if [ -n "$redis" ]; then
        BROADCASTER_REDIS_URL=$redis "$BIN" serve --listen 127.0.0.1:"$port" --shards "$shards" >"$log" 2>&1 &
    else
        env -u BROADCASTER_REDIS_URL "$BIN" serve --listen 127.0.0.1:"$port" --shards "$shards" >"$log" 2>&1 &
    fi
    NODE_PID=$!
    PIDS+=("$NODE_PID")
    for _ in $(seq 100); do
        grep -q "listening public=" "$log" && return 0
        sleep 0.1
    done
    echo "node on port $port did not start:" >&2
    cat "$log" >&2
    exit 2
}

stop_all() {
    cleanup
    PIDS=()
}

publish_opts="--rate $RATE"
[ "$RATE" = 0 ] && publish_opts="--rate 0 --window $WINDOW"

# run_lt LABEL JSON, with SERVERS (--server options) and SPIDS (--server-pid options) set.
run_lt() {
    local label=$1 json=$2
    echo "=== $label" >&2
    # shellcheck disable=SC2086,SC2153
    "$LT" fanout -s "$S" $publish_opts --duration "$DUR" $SERVERS $SPIDS \
        --label "$label" --json "$OUT/$json.json" --hgrm "$OUT/$json.hgrm" --quiet $EXTRA \
        | tee "$OUT/$json.txt"
}

# 1. One node, one shard.
start_node "$BASE" 1
SERVERS="--server 127.0.0.1:$BASE" SPIDS="--server-pid $NODE_PID" run_lt "1 node, 1 shard" single-1shard || true
stop_all

# 2. One node, two shards (the cores the two cluster nodes use together).
start_node "$BASE" 2
SERVERS="--server 127.0.0.1:$BASE" SPIDS="--server-pid $NODE_PID" run_lt "1 node, 2 shards" single-2shards || true
stop_all

# 3. Two nodes and one Redis; subscribers alternate between the nodes, publications go to the first
#    (PUBLISH_ALL=1: to both, round robin). CPU is summed over both nodes and Redis.
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no >"$OUT/redis.log" 2>&1 &
REDIS_PID=$!
PIDS+=("$REDIS_PID")
for _ in $(seq 50); do
    redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break
    sleep 0.1
done
URL="redis://127.0.0.1:$REDIS_PORT"
start_node $((BASE + 1)) 1 "$URL"
A=$NODE_PID
start_node $((BASE + 2)) 1 "$URL"
B=$NODE_PID
all=""
[ "${PUBLISH_ALL:-0}" = 1 ] && all="--publish-all"
SERVERS="--server 127.0.0.1:$((BASE + 1)) --server 127.0.0.1:$((BASE + 2)) $all" \
    SPIDS="--server-pid $A --server-pid $B --server-pid $REDIS_PID" \
    run_lt "2 nodes + Redis" cluster-2nodes || true
stop_all

echo "results in $OUT/ (*.txt tables, *.json summaries, *.hgrm distributions)" >&2
