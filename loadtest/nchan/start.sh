#!/bin/sh
# Renders nginx.conf.template into DIR (created if need be) for PORT and runs nginx in the
# foreground, one process: its pid is the one to give the load generator as --server-pid.
#   loadtest/nchan/start.sh /tmp/nchan 8090 &
#   broadcaster-loadtest fanout --peer nchan --server 127.0.0.1:8090 --server-pid $!
set -eu
dir=${1:?usage: start.sh DIR PORT}
port=${2:?usage: start.sh DIR PORT}
if [ ! -e /usr/lib/nginx/modules/ngx_nchan_module.so ] || ! command -v nginx >/dev/null 2>&1; then
    echo "start.sh: install the Debian packages nginx and libnginx-mod-nchan" >&2
    exit 2
fi
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
sed -e "s|@DIR@|$dir|g" -e "s|@PORT@|$port|g" "$(dirname "$0")/nginx.conf.template" >"$dir/nginx.conf"
exec nginx -c "$dir/nginx.conf" -p "$dir" -e "$dir/error.log"
