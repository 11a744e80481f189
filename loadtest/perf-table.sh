#!/usr/bin/env bash
# Runs every performance scenario of the README against a release server pinned to CPU 0, with the
# load generator on CPU 1, and prints one summary block per scenario. Usage: perf-table.sh OUTDIR
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-/tmp/perf}
mkdir -p "$out"
server=./target/release/broadcaster
lt=${LOADTEST:-./target/release/broadcaster-loadtest}
export BROADCASTER_AUTH_JWT_SECRET=perf-secret BROADCASTER_AUTH_API_KEYS=perf-key
export BROADCASTER_LIMITS_MAX_CONNECTIONS=1000000
start() { # shards
  taskset -c 0 "$server" serve --listen 127.0.0.1:0 --shards "$1" >"$out/server.out" 2>"$out/server.err" &
  spid=$!
  for _ in $(seq 50); do grep -q 'listening public=' "$out/server.out" 2>/dev/null && break; sleep 0.1; done
  addr=$(grep -o 'public=.*' "$out/server.out" | cut -d= -f2)
}
stop() { kill "$spid" 2>/dev/null || true; wait "$spid" 2>/dev/null || true; }
run() { # name shards args...
  local name=$1 shards=$2; shift 2
  start "$shards"
  "$lt" "$@" --server "$addr" --server-pid "$spid" --cpus 1 --json "$out/$name.json" --hgrm "$out/$name.hgrm" >"$out/$name.txt" 2>&1 || echo "$name FAILED"
  stop
  grep -E "deliveries/s|latency ms|CPU per|floor|RSS per|connections/s|result" "$out/$name.txt" | sed "s/^/$name: /"
}
run fanout1000x50 1 fanout -s 1000 --rate 50 --duration 10 --floor --plot "$out/fanout1000x50.svg"
run fanout5000x10 1 fanout -s 5000 --rate 10 --duration 10 --floor
run fanout1000max 1 fanout -s 1000 --rate 0 --window 4 --pipeline 4 --duration 10 --floor
run chat100x50 1 chat -c 100 -k 50 --rate 1000 --duration 10 --floor
run fanout1000x50-2shards 2 fanout -s 1000 --rate 50 --duration 10 --floor
run idle19000 1 idle -n 19000 --hold 5
run storm10000 1 storm -n 10000
