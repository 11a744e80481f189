#!/usr/bin/env bash
# Runs the server in Docker twice, from an image built from scratch (the binary and the four
# libraries it links, nothing pulled): under a profile that denies io_uring it must print the
# one-line cause-and-fix error and exit 1; under tuning/seccomp.json it must serve /health and
# exit 0 on `docker stop`. Usage: tuning/docker-seccomp-check.sh [PORT]  (needs dockerd running)
set -euo pipefail
cd "$(dirname "$0")/.."
port=${1:-18931}
image=broadcaster-seccomp-check
cargo build --release --bin broadcaster -q

root=$(mktemp -d)
trap 'rm -rf "$root"; docker rm -f "$image" >/dev/null 2>&1 || true' EXIT
mkdir -p "$root/lib64" "$root/lib/x86_64-linux-gnu" "$root/tmp"
cp target/release/broadcaster "$root/"
# Copy each library ldd names to its own path inside the image.
for lib in $(ldd target/release/broadcaster | grep -o '/[^ ]*'); do
  mkdir -p "$root$(dirname "$lib")"
  cp -L "$lib" "$root$lib"
done
tar -C "$root" -c . | docker import - "$image" >/dev/null

cat >"$root/deny-io_uring.json" <<'JSON'
{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["io_uring_setup", "io_uring_enter",
 "io_uring_register"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]}
JSON
status=0
out=$(docker run --rm --network host --security-opt seccomp="$root/deny-io_uring.json" "$image" \
  /broadcaster serve --listen "127.0.0.1:$port" 2>&1) || status=$?
echo "io_uring denied: exit $status: $out"
if ! { [ "$status" -eq 1 ] && grep -q "io_uring is not available" <<<"$out" \
  && grep -q "tuning/seccomp.json" <<<"$out"; }; then
  echo "docker-seccomp-check: FAILED: expected exit 1 and the io_uring message"; exit 1
fi

docker run -d --name "$image" --network host --security-opt seccomp="$PWD/tuning/seccomp.json" \
  "$image" /broadcaster serve --listen "127.0.0.1:$port" >/dev/null
for _ in $(seq 50); do curl -fs "127.0.0.1:$port/health" >/dev/null && break; sleep 0.1; done
health=$(curl -fs "127.0.0.1:$port/health" || true)
docker stop -t 10 "$image" >/dev/null
code=$(docker inspect "$image" --format '{{.State.ExitCode}}')
echo "tuning/seccomp.json: /health $health, exit $code after docker stop"
if ! { [ "$health" = '{"status":"ok"}' ] && [ "$code" -eq 0 ]; }; then
  echo "docker-seccomp-check: FAILED: expected /health ok and exit 0"; exit 1
fi
echo "docker-seccomp-check: ok"
