#!/usr/bin/env bash
# Cluster benchmark: the same load on one node (one shard, then as many shards as the two nodes have
# together), on two nodes sharing one Redis (standalone), and on two nodes sharing a Redis Cluster of
# three masters (sharded pub/sub). Each run reports deliveries/s and, for the Redis runs, Redis's CPU
# per publication (`--broker-pid`); a last table compares standalone and cluster. Run from the
# repository root after
#     cargo build --release -p broadcaster -p loadtest
# Environment: MODES (which runs, "single standalone cluster"), SCENARIO (fanout: one channel of S
# subscribers; chat: C channels of K subscribers, publications round robin over them), S (10000),
# C (100), K (50), RATE (msg/s, 10; 0 = max rate with WINDOW publications in flight), WINDOW (4),
# DUR (seconds, 20), OUT (output folder, cluster-bench), BIN and LT (binaries, target/release/...),
# REDIS_PORT (16379; the cluster uses the three ports after it, and those + 10000 for its bus),
# BASE_PORT (18100), PUBLISH_ALL (1: publish round robin to both nodes), EXTRA (more load
# generator options).
set -euo pipefail

BIN=${BIN:-target/release/broadcaster}
LT=${LT:-target/release/broadcaster-loadtest}
MODES=${MODES:-single standalone cluster}
SCENARIO=${SCENARIO:-fanout}
S=${S:-10000}
C=${C:-100}
K=${K:-50}
RATE=${RATE:-10}
WINDOW=${WINDOW:-4}
DUR=${DUR:-20}
OUT=${OUT:-cluster-bench}
REDIS_PORT=${REDIS_PORT:-16379}
BASE=${BASE_PORT:-18100}
EXTRA=${EXTRA:-}
export BROADCASTER_AUTH_JWT_SECRET=${BROADCASTER_AUTH_JWT_SECRET:-$(head -c 32 /dev/urandom | base64)}
export BROADCASTER_AUTH_API_KEYS=${BROADCASTER_AUTH_API_KEYS:-lt-key}
# Every subscriber connects from loopback before its auth: lift the per-address cap on those.
export BROADCASTER_LIMITS_ANONYMOUS_CONNECTIONS_PER_IP_MAX=1000000
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

case "$SCENARIO" in
fanout) scenario="fanout -s $S" ;;
chat) scenario="chat -c $C -k $K" ;;
*) echo "SCENARIO is fanout or chat" >&2; exit 2 ;;
esac

# run_lt LABEL JSON, with SERVERS (--server options), SPIDS (--server-pid options) and BROKER
# (--broker-pid options, or empty) set.
run_lt() {
    local label=$1 json=$2
    echo "=== $label" >&2
    # shellcheck disable=SC2086,SC2153
    "$LT" $scenario $publish_opts --duration "$DUR" $SERVERS $SPIDS ${BROKER:-} \
        --label "$label" --json "$OUT/$json.json" --hgrm "$OUT/$json.hgrm" --quiet $EXTRA \
        | tee "$OUT/$json.txt"
}

# start_redis PORT [ARGS...]: a redis-server on loopback, waited for; sets REDIS_PID.
start_redis() {
    local port=$1
    shift
    redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no "$@" \
        >"$OUT/redis-$port.log" 2>&1 &
    REDIS_PID=$!
    PIDS+=("$REDIS_PID")
    for _ in $(seq 50); do
        redis-cli -p "$port" ping >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    echo "redis-server on $port did not start" >&2
    exit 2
}

all=""
[ "${PUBLISH_ALL:-0}" = 1 ] && all="--publish-all"

# two_nodes LABEL JSON ENV...: two one-shard nodes with ENV (the Redis they share); subscribers
# alternate between them, publications go to the first (PUBLISH_ALL=1: to both, round robin).
# Server CPU is the two nodes'; Redis's is reported apart (BROKER).
two_nodes() {
    local label=$1 json=$2
    shift 2
    env "$@" "$BIN" serve --listen 127.0.0.1:$((BASE + 1)) --shards 1 >"$OUT/node-$((BASE + 1)).log" 2>&1 &
    local a=$!
    PIDS+=("$a")
    env "$@" "$BIN" serve --listen 127.0.0.1:$((BASE + 2)) --shards 1 >"$OUT/node-$((BASE + 2)).log" 2>&1 &
    local b=$!
    PIDS+=("$b")
    for port in $((BASE + 1)) $((BASE + 2)); do
        for _ in $(seq 100); do
            curl -fs "127.0.0.1:$port/health" 2>/dev/null | grep -q '"ok"' && break
            sleep 0.1
        done
    done
    SERVERS="--server 127.0.0.1:$((BASE + 1)) --server 127.0.0.1:$((BASE + 2)) $all" \
        SPIDS="--server-pid $a --server-pid $b" run_lt "$label" "$json" || true
}

for mode in $MODES; do
    case "$mode" in
    single)
        # One node, one shard; then two shards (the cores the two cluster nodes use together).
        start_node "$BASE" 1
        SERVERS="--server 127.0.0.1:$BASE" SPIDS="--server-pid $NODE_PID" BROKER="" \
            run_lt "1 node, 1 shard" single-1shard || true
        stop_all
        start_node "$BASE" 2
        SERVERS="--server 127.0.0.1:$BASE" SPIDS="--server-pid $NODE_PID" BROKER="" \
            run_lt "1 node, 2 shards" single-2shards || true
        stop_all
        ;;
    standalone)
        start_redis "$REDIS_PORT"
        BROKER="--broker-pid $REDIS_PID" two_nodes "2 nodes + one Redis" cluster-2nodes \
            BROADCASTER_REDIS_URL="redis://127.0.0.1:$REDIS_PORT"
        stop_all
        ;;
    cluster)
        # Three masters, no replicas (a benchmark, not a failover test).
        masters=()
        broker=""
        for i in 1 2 3; do
            port=$((REDIS_PORT + i))
            rm -rf "${OUT:?}/rc-$port" && mkdir -p "$OUT/rc-$port"
            start_redis "$port" --cluster-enabled yes --dir "$OUT/rc-$port" \
                --cluster-config-file nodes.conf
            masters+=("127.0.0.1:$port")
            broker="$broker --broker-pid $REDIS_PID"
        done
        redis-cli --cluster create "${masters[@]}" --cluster-replicas 0 --cluster-yes \
            >"$OUT/redis-cluster-create.log" 2>&1
        for _ in $(seq 100); do
            redis-cli -p $((REDIS_PORT + 1)) cluster info | grep -q cluster_state:ok && break
            sleep 0.1
        done
        BROKER="$broker" two_nodes "2 nodes + Redis Cluster (3 masters)" cluster-3masters \
            BROADCASTER_REDIS_MODE=cluster \
            BROADCASTER_REDIS_URLS="redis://${masters[0]},redis://${masters[1]}"
        stop_all
        ;;
    *) echo "unknown mode $mode (single, standalone, cluster)" >&2; exit 2 ;;
    esac
done

# Standalone against cluster, side by side.
if [ -f "$OUT/cluster-2nodes.json" ] && [ -f "$OUT/cluster-3masters.json" ]; then
    python3 - "$OUT/cluster-2nodes.json" "$OUT/cluster-3masters.json" <<'PY'
import json, sys
rows = [("Redis standalone", sys.argv[1]), ("Redis Cluster, 3 masters", sys.argv[2])]
print("| broker | deliveries/s | publications | Redis CPU per publication | latency p50 / p99 ms |")
print("|---|---|---|---|---|")
for name, path in rows:
    r = json.load(open(path))
    per = r.get("broker_cpu_us_per_publication")
    lat = r.get("latency", {})
    print(f"| {name} | {r['deliveries_per_s']:,.0f} | {r.get('publish', {}).get('published', '-')} "
          f"| {per:.1f} µs | {lat.get('p50_ns', 0) / 1e6:.2f} / {lat.get('p99_ns', 0) / 1e6:.2f} |"
          if per is not None else f"| {name} | {r['deliveries_per_s']:,.0f} | - | - | - |")
PY
fi

echo "results in $OUT/ (*.txt tables, *.json summaries, *.hgrm distributions)" >&2
