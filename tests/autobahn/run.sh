#!/usr/bin/env bash
# Runs the real Autobahn|Testsuite (wstest -m fuzzingclient, every case group, permessage-deflate
# groups 12 and 13 included) against a Broadcaster server on a loopback port, then classifies the
# per-case reports with classify.py: exit 0 when no case misbehaved, 1 otherwise (2: the run
# itself failed).
#
#   tests/autobahn/run.sh [--quick] [--server BIN] [--cases '1.*,2.*'] [--max-frame-bytes N] [--out DIR]
#
#   --quick         leave out the slowest cases (listed below): about half the time
#   --server BIN    the broadcaster binary to test (or BROADCASTER_BIN=BIN); default: build it
#                   with `cargo build --release --bin broadcaster` and use
#                   ${CARGO_TARGET_DIR:-target}/release/broadcaster
#   --cases LIST    comma-separated Autobahn case patterns instead of all ("*")
#   --max-frame-bytes N   the server's limits.max_frame_bytes (default 32 MiB, above Autobahn's
#                   largest message); a smaller one shows the cases over it as "limit"
#   --out DIR       where the config, spec, server log and reports go; default
#                   ${CARGO_TARGET_DIR:-target}/autobahn
#
# Environment: AUTOBAHN_CACHE (default ~/.cache/broadcaster-autobahn) holds the Python 2.7
# virtualenv, reused while requirements-py27.txt is unchanged; AUTOBAHN_PYTHON2 names the Python
# 2.7 interpreter (default: python2.7 on PATH, else the newest ~/.pyenv/versions/2.7.*).
#
# Autobahn|Testsuite runs only on Python 2.7. The virtualenv is made by virtualenv<20.22 (the
# last releases that still create 2.7 environments), itself installed in a small Python 3 venv
# beside it; everything comes from PyPI with the pins of requirements-py27.txt.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
target=${CARGO_TARGET_DIR:-$repo/target}

quick=0
server=${BROADCASTER_BIN:-}
cases='"*"'
out=$target/autobahn
max_frame_bytes=$((32 << 20))
while [ $# -gt 0 ]; do
    case $1 in
        --quick) quick=1 ;;
        --server) server=$2; shift ;;
        --server=*) server=${1#*=} ;;
        --cases) cases=$(printf '%s' "$2" | sed 's/[^,][^,]*/"&"/g'); shift ;;
        --cases=*) cases=$(printf '%s' "${1#*=}" | sed 's/[^,][^,]*/"&"/g') ;;
        --max-frame-bytes) max_frame_bytes=$2; shift ;;
        --max-frame-bytes=*) max_frame_bytes=${1#*=} ;;
        --out) out=$2; shift ;;
        --out=*) out=${1#*=} ;;
        -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
        *) echo "run.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

# Quick mode leaves out (a full run takes about 2.5 min on a 2-vCPU machine, nearly all of it
# Autobahn's timers running out in cases that wait for an echo):
# - 1.1.6-1.1.8, 1.2.6-1.2.8, 10.1.1: 64 KiB+ messages whose echo case waits 10 s each (70 s);
# - 9.*: messages of 64 KiB to 16 MiB, whole and in fragments, and the pipelined 9.7/9.8 ones
#   (about 6 s here, much more against a server that echoes or a debug build);
# - 12.x/13.x with 128 KiB messages (their sizes 10 and 15-18: 131072 bytes, whole and
#   auto-fragmented by 256, 1k, 4k and 32k); the 8-64 KiB fragmented ones stay.
quick_exclude='"9.*", "1.1.6", "1.1.7", "1.1.8", "1.2.6", "1.2.7", "1.2.8", "10.1.1"'
for group in 12.1 12.2 12.3 12.4 12.5 13.1 13.2 13.3 13.4 13.5 13.6 13.7; do
    for size in 10 15 16 17 18; do
        quick_exclude="$quick_exclude, \"$group.$size\""
    done
done

log() { printf 'autobahn: %s\n' "$*" >&2; }

# --- the Python 2.7 virtualenv ---------------------------------------------------------------
cache=${AUTOBAHN_CACHE:-$HOME/.cache/broadcaster-autobahn}
venv=$cache/venv27
stamp=$(sha256sum "$here/requirements-py27.txt" | cut -c1-16)
if [ ! -x "$venv/bin/wstest" ] || [ "$(cat "$venv/.stamp" 2>/dev/null)" != "$stamp" ]; then
    # The first candidate that runs as 2.7 (a pyenv shim named python2.7 may not).
    py2=
    for candidate in ${AUTOBAHN_PYTHON2:-} $(command -v python2.7 || true) \
        $(ls -d "$HOME"/.pyenv/versions/2.7.*/bin/python 2>/dev/null | sort -rV); do
        if "$candidate" -c 'import sys; assert sys.version_info[:2] == (2, 7)' 2>/dev/null; then
            py2=$candidate
            break
        fi
    done
    if [ -z "$py2" ]; then
        log "no Python 2.7 found: set AUTOBAHN_PYTHON2 (pyenv install 2.7.18 makes one)"
        exit 2
    fi
    log "making the Python 2.7 virtualenv in $venv (from $py2)"
    rm -rf "$venv" "$cache/bootstrap"
    mkdir -p "$cache"
    python3 -m venv "$cache/bootstrap"
    "$cache/bootstrap/bin/pip" install -q 'virtualenv<20.22'
    "$cache/bootstrap/bin/virtualenv" -q -p "$py2" "$venv"
    if ! "$venv/bin/pip" install -q --disable-pip-version-check -r "$here/requirements-py27.txt" \
        > "$cache/pip.log" 2>&1; then
        log "pip install failed:"; cat "$cache/pip.log" >&2; exit 2
    fi
    "$venv/bin/wstest" --autobahnversion >/dev/null
    echo "$stamp" > "$venv/.stamp"
fi

# --- the server binary -------------------------------------------------------------------------
if [ -z "$server" ]; then
    log "building the server (cargo build --release --bin broadcaster; --server BIN skips this)"
    (cd "$repo" && cargo build --release --bin broadcaster)
    server=$target/release/broadcaster
fi
[ -x "$server" ] || { log "no server binary at $server"; exit 2; }

# --- configuration, spec --------------------------------------------------------------------
rm -rf "$out"
mkdir -p "$out/reports"
out=$(cd "$out" && pwd)
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')

# Autobahn is an echo client; each limit below is one an echo test runs into with the defaults.
cat > "$out/server.toml" <<EOF
listen = "127.0.0.1:$port"
shards = 1

[auth]
# Set so the server is not in dev mode; no case authenticates.
jwt_secret = "autobahn-testsuite-run-only-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"

[limits]
# Every connection stays unauthenticated: no close 4001 during a case (9.x cases last seconds,
# and Autobahn holds a connection up to its timer when no echo comes).
auth_timeout = "1h"
# 9.1.6/9.2.6 send 16 MiB messages (the default is 64 KiB, and 1.x, 10.1.1, 12.x and 13.x send
# 64-128 KiB ones); 32 MiB leaves room. The config sets no upper bound.
max_frame_bytes = $max_frame_bytes
# Must be at least max_frame_bytes (the config refuses less).
outbound_buffer_bytes = $max_frame_bytes
# Every message is a request for the rate limit (an answered non-request too): 9.7/9.8 send
# 1,000 messages back to back, and a burst over 200 would get ResourceExhausted answers and, past
# 100 of those, close 4004.
requests_per_second = 1000000
request_burst = 1000000
# A server ping in the middle of a case would be an event Autobahn does not expect.
ping_interval = "1h"
# Cases run one after another, but a connection may still be closing when the next opens; one
# address must be able to hold more than the default 64 anonymous connections.
anonymous_connections_per_ip_max = 100000

[log]
level = "warn"
EOF

if [ $quick = 1 ]; then exclude=$quick_exclude; else exclude=; fi
cat > "$out/fuzzingclient.json" <<EOF
{
  "outdir": "$out/reports",
  "servers": [{"agent": "broadcaster", "url": "ws://127.0.0.1:$port/ws"}],
  "cases": [$cases],
  "exclude-cases": [$exclude],
  "exclude-agent-cases": {}
}
EOF

# --- run ----------------------------------------------------------------------------------
log "server $server on 127.0.0.1:$port (config $out/server.toml, log $out/server.log)"
"$server" serve --config "$out/server.toml" > "$out/server.log" 2>&1 &
server_pid=$!
stop_server() {
    if kill -0 "$server_pid" 2>/dev/null; then
        kill -TERM "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
    fi
}
trap stop_server EXIT
for _ in $(seq 100); do
    if python3 - "$port" <<'EOF' 2>/dev/null; then break; fi
import socket, sys
socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=1).close()
EOF
    kill -0 "$server_pid" 2>/dev/null || { log "the server exited at start:"; cat "$out/server.log" >&2; exit 2; }
    sleep 0.1
done

started=$(date +%s)
log "wstest -m fuzzingclient (log $out/wstest.log)"
if ! (cd "$out" && "$venv/bin/wstest" -m fuzzingclient -s "$out/fuzzingclient.json") > "$out/wstest.log" 2>&1; then
    log "wstest failed:"; tail -20 "$out/wstest.log" >&2; exit 2
fi
log "Autobahn ran $(grep -c '^Running test case' "$out/wstest.log") cases in $(( $(date +%s) - started )) s"

server_alive=1
kill -0 "$server_pid" 2>/dev/null || server_alive=0
stop_server
trap - EXIT
if [ $server_alive = 0 ]; then
    log "MISBEHAVED: the server exited during the run; its log:"; tail -40 "$out/server.log" >&2
fi

# --- classify -------------------------------------------------------------------------------
status=0
python3 "$here/classify.py" "$out/reports" --max-frame-bytes "$max_frame_bytes" || status=$?
log "reports: $out/reports/index.html"
if [ $server_alive = 0 ]; then exit 1; fi
exit $status
