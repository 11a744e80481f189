#!/usr/bin/env bash
# Builds the Broadcaster container image from scratch: the server binary (debug info stripped,
# symbols kept for backtraces), the shared libraries `ldd` names at their own paths, /tmp, and a
# passwd/group naming the unprivileged user 65532. Nothing is pulled, so it works offline.
#
# Usage: deploy/build-image.sh [--binary PATH] [TAG]
#   --binary PATH  put this binary in the image (default: `cargo build --release` and use it)
#   TAG            image name (default broadcaster:latest)
# Prints the tag and the image size. Needs a running dockerd.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)

binary=""
tag=broadcaster:latest
while [ $# -gt 0 ]; do
  case $1 in
    --binary) binary=${2:?--binary needs a path}; shift 2 ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    -*) echo "build-image: unknown option $1" >&2; exit 2 ;;
    *) tag=$1; shift ;;
  esac
done
if [ -z "$binary" ]; then
  (cd "$repo" && cargo build --release --bin broadcaster -q)
  binary="${CARGO_TARGET_DIR:-$repo/target}/release/broadcaster"
fi
[ -x "$binary" ] || { echo "build-image: $binary is not an executable" >&2; exit 1; }

ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
root=$ctx/rootfs
mkdir -p "$root/tmp" "$root/etc"
chmod 1777 "$root/tmp"
# Debug info is most of the file (the release profile keeps line tables); the symbol table stays,
# so a panic's backtrace still names functions.
if command -v strip >/dev/null; then
  strip --strip-debug -o "$root/broadcaster" "$binary"
else
  cp "$binary" "$root/broadcaster"
fi
# Each library at the path the dynamic loader looks for it (the loader itself included).
for lib in $(ldd "$binary" | grep -o '/[^ ]*'); do
  mkdir -p "$root$(dirname "$lib")"
  cp -L "$lib" "$root$lib"
done
# glibc reads these to resolve host names (Redis by service name); it has files and dns built in.
printf 'hosts: files dns\n' >"$root/etc/nsswitch.conf"
printf 'root:x:0:0:root:/:/sbin/nologin\nbroadcaster:x:65532:65532:broadcaster:/:/sbin/nologin\n' \
  >"$root/etc/passwd"
printf 'root:x:0:\nbroadcaster:x:65532:\n' >"$root/etc/group"
cp "$repo/deploy/Dockerfile" "$ctx/Dockerfile"

docker build -q -t "$tag" "$ctx" >/dev/null
size=$(docker image inspect "$tag" --format '{{.Size}}')
echo "built $tag: $((size / 1000000)) MB ($size bytes)"
