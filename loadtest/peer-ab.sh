#!/usr/bin/env bash
# Broadcaster against Nchan (nginx + libnginx-mod-nchan), side by side: each scenario runs against
# one then the other, alternately, a fresh server process each time, the server pinned to CPU 0
# (one shard; one nginx process with master_process off) and the load generator to CPU 1. RUNS
# rounds (3) of every scenario; the table printed at the end has each figure's median per server
# and their ratio (Broadcaster / Nchan: below 1 is better for CPU, memory and latency, above 1 for
# throughput). Run from the repository root after
#     cargo build --release -p broadcaster -p loadtest
# Environment: RUNS (3), OUT (peer-ab), SCENARIOS (all of: fan1000 fan5000 chat max idle storm10k
# storm19k), PORT (18300: the first of the ports used, one per server started), BIN and LT (binaries, target/release/...). Nchan runs from
# loadtest/nchan/start.sh (Debian packages nginx and libnginx-mod-nchan).
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=${BIN:-target/release/broadcaster}
LT=${LT:-target/release/broadcaster-loadtest}
RUNS=${RUNS:-3}
OUT=${OUT:-peer-ab}
BASE_PORT=${PORT:-18300}
PORT=$BASE_PORT
SCENARIOS=${SCENARIOS:-fan1000 fan5000 chat max idle storm10k storm19k}
export BROADCASTER_AUTH_JWT_SECRET=${BROADCASTER_AUTH_JWT_SECRET:-$(head -c 32 /dev/urandom | base64)}
export BROADCASTER_AUTH_API_KEYS=${BROADCASTER_AUTH_API_KEYS:-lt-key}
# Every subscriber connects from loopback before its auth, and the storms hold 19,000.
export BROADCASTER_LIMITS_ANONYMOUS_CONNECTIONS_PER_IP_MAX=1000000
export BROADCASTER_LIMITS_MAX_CONNECTIONS=1000000
mkdir -p "$OUT"

# The load generator's arguments per scenario.
args_of() {
    case "$1" in
    fan1000) echo "fanout -s 1000 --rate 50 --duration 10" ;;
    fan5000) echo "fanout -s 5000 --rate 10 --duration 10" ;;
    chat) echo "chat -c 100 -k 50 --rate 1000 --duration 10" ;;
    max) echo "fanout -s 1000 --rate 0 --window 4 --duration 10" ;;
    idle) echo "idle -n 19000 --hold 5" ;;
    storm10k) echo "storm -n 10000" ;;
    storm19k) echo "storm -n 19000" ;;
    *) echo "unknown scenario $1" >&2; exit 2 ;;
    esac
}

SPID=""
stop_server() {
    [ -n "$SPID" ] && { kill "$SPID" 2>/dev/null || true; wait "$SPID" 2>/dev/null || true; }
    SPID=""
}
trap stop_server EXIT

wait_port() {
    for _ in $(seq 100); do
        (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && return 0
        sleep 0.05
    done
    echo "nothing listens on $PORT" >&2
    exit 2
}

# start_server broadcaster|nchan: a fresh process on CPU 0, on a port of its own (a port just
# used may still have connections in TIME_WAIT, which nginx's bind refuses); sets SPID and PORT.
STARTS=0
start_server() {
    PORT=$((BASE_PORT + STARTS))
    STARTS=$((STARTS + 1))
    case "$1" in
    broadcaster)
        taskset -c 0 "$BIN" serve --listen "127.0.0.1:$PORT" --shards 1 >"$OUT/server.log" 2>&1 &
        SPID=$!
        ;;
    nchan)
        rm -rf "$OUT/nginx"
        # start.sh execs nginx (one process, master_process off): $! is the server's pid.
        taskset -c 0 loadtest/nchan/start.sh "$OUT/nginx" "$PORT" >"$OUT/server.log" 2>&1 &
        SPID=$!
        ;;
    esac
    wait_port
}

for run in $(seq "$RUNS"); do
    for scenario in $SCENARIOS; do
        for peer in broadcaster nchan; do
            start_server "$peer"
            json="$OUT/$scenario-$peer-$run.json"
            # shellcheck disable=SC2046
            "$LT" $(args_of "$scenario") --peer "$peer" --server "127.0.0.1:$PORT" \
                --server-pid "$SPID" --cpus 1 --quiet --json "$json" >"$OUT/$scenario-$peer-$run.txt" 2>&1 \
                || echo "$scenario $peer run $run FAILED (see $OUT/$scenario-$peer-$run.txt)" >&2
            stop_server
        done
    done
done

python3 - "$OUT" "$RUNS" $SCENARIOS <<'PY'
import json, os, statistics, sys
out, runs, scenarios = sys.argv[1], int(sys.argv[2]), sys.argv[3:]

def figures(scenario, r):
    lat = r.get("latency") or {}
    f = {}
    if scenario == "idle":
        f["server RSS per connection, B"] = r.get("server_rss_bytes_per_connection")
    elif scenario.startswith("storm"):
        f["server CPU per connection, µs"] = r.get("server_cpu_us_per_connection")
        f["connections/s"] = r.get("connections_per_s")
    else:
        f["server CPU per delivery, µs"] = r.get("server_cpu_us_per_delivery")
        f["deliveries/s"] = r.get("deliveries_per_s")
        f["p50 ms"] = lat.get("p50_ns", 0) / 1e6 if lat else None
        f["p99 ms"] = lat.get("p99_ns", 0) / 1e6 if lat else None
    return f

print("| scenario | figure | Broadcaster | Nchan | ratio |")
print("|---|---|---|---|---|")
for s in scenarios:
    per = {}
    for peer in ("broadcaster", "nchan"):
        vals = {}
        for run in range(1, runs + 1):
            path = os.path.join(out, f"{s}-{peer}-{run}.json")
            if not os.path.exists(path):
                continue
            for k, v in figures(s, json.load(open(path))).items():
                if v is not None:
                    vals.setdefault(k, []).append(v)
        per[peer] = {k: statistics.median(v) for k, v in vals.items()}
    for k in per["broadcaster"].keys() | per["nchan"].keys():
        b, n = per["broadcaster"].get(k), per["nchan"].get(k)
        ratio = f"{b / n:.2f}x" if b is not None and n else "-"
        fmt = lambda v: "-" if v is None else (f"{v:,.0f}" if v >= 100 else f"{v:.2f}")
        print(f"| {s} | {k} | {fmt(b)} | {fmt(n)} | {ratio} |")
PY
