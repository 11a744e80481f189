#!/usr/bin/env bash
# check-host.sh — compares this host with what Broadcaster recommends (tuning/README.md) and prints
# what to change. It changes nothing and exits 0 whatever it finds (CI runs it on untuned machines);
# it exits 2 only on bad usage.
#
# Usage: tuning/check-host.sh [--quiet]    (--quiet: print only what differs)
set -uo pipefail

quiet=0
case "${1:-}" in
  "") ;;
  --quiet) quiet=1 ;;
  -h | --help)
    sed -n '2,6p' "$0"
    exit 0
    ;;
  *)
    echo "usage: $0 [--quiet]" >&2
    exit 2
    ;;
esac

changes=()
notes=()

row() {
  # row STATUS NAME CURRENT RECOMMENDED
  if [[ $quiet -eq 1 && $1 == ok ]]; then
    return
  fi
  printf '  %-6s %-38s %-28s %s\n' "$1" "$2" "$3" "$4"
}

read_sysctl() {
  local path="/proc/sys/${1//.//}"
  if [[ -r $path ]]; then
    tr -s ' \t' ' ' <"$path"
  else
    echo ""
  fi
}

# check_sysctl KEY MODE RECOMMENDED
#   MODE: min (current >= rec), max (current <= rec), eq, span (second minus first >= rec's),
#         last (last field >= rec's last field)
check_sysctl() {
  local key=$1 mode=$2 rec=$3 cur ok=0
  cur=$(read_sysctl "$key")
  if [[ -z $cur ]]; then
    row "n/a" "$key" "(unreadable)" "$rec"
    return
  fi
  local -a c r
  read -r -a c <<<"$cur"
  read -r -a r <<<"$rec"
  case $mode in
    min) ((c[0] >= r[0])) && ok=1 ;;
    max) ((c[0] <= r[0])) && ok=1 ;;
    eq) [[ ${c[*]} == "${r[*]}" ]] && ok=1 ;;
    span) ((c[1] - c[0] >= r[1] - r[0])) && ok=1 ;;
    last) ((c[${#c[@]} - 1] >= r[${#r[@]} - 1])) && ok=1 ;;
  esac
  if ((ok)); then
    row ok "$key" "$cur" "$rec"
  else
    row CHANGE "$key" "$cur" "$rec"
    changes+=("sysctl -w $key=\"$rec\"   # and persist in /etc/sysctl.d/99-broadcaster.conf")
  fi
}

echo "Broadcaster host check ($(uname -srm), $(nproc) CPUs usable)"
echo
printf '  %-6s %-38s %-28s %s\n' "" "setting" "current" "recommended"

echo "kernel (tuning/99-broadcaster.conf):"
check_sysctl net.core.somaxconn min 65535
check_sysctl net.ipv4.tcp_max_syn_backlog min 65535
check_sysctl net.ipv4.ip_local_port_range span "1024 65535"
check_sysctl net.ipv4.tcp_mem last "1048576 2097152 3145728"
check_sysctl net.ipv4.tcp_rmem last "4096 16384 4194304"
check_sysctl net.ipv4.tcp_wmem last "4096 65536 4194304"
check_sysctl net.core.rmem_max min 16777216
check_sysctl net.core.wmem_max min 16777216
check_sysctl fs.nr_open min 2097152
check_sysctl fs.file-max min 4194304
check_sysctl net.core.netdev_max_backlog min 65536
check_sysctl net.ipv4.tcp_slow_start_after_idle eq 0
check_sysctl net.ipv4.tcp_tw_reuse eq 1
check_sysctl net.ipv4.tcp_fin_timeout max 15
check_sysctl fs.epoll.max_user_watches min 1048576

echo "limits of this shell (tuning/limits.conf, LimitNOFILE/LimitMEMLOCK in broadcaster.service):"
nofile_soft=$(ulimit -Sn)
nofile_hard=$(ulimit -Hn)
if [[ $nofile_hard == unlimited ]] || ((nofile_hard >= 1048576)); then
  row ok "nofile (hard)" "$nofile_hard" "1048576"
else
  row CHANGE "nofile (hard)" "$nofile_hard" "1048576"
  changes+=("raise nofile to 1048576 (limits.conf or LimitNOFILE=); this host caps a process at $nofile_hard connections")
fi
if [[ $nofile_soft != "$nofile_hard" ]]; then
  row note "nofile (soft)" "$nofile_soft" "= hard (the server and load generator raise it themselves)"
fi
memlock=$(ulimit -l)
if [[ $memlock == unlimited ]]; then
  row ok "memlock" "$memlock" "unlimited"
else
  row CHANGE "memlock (KiB)" "$memlock" "unlimited"
  changes+=("set memlock unlimited (limits.conf or LimitMEMLOCK=infinity): glommio locks its io_uring memory")
fi

echo "io_uring (glommio needs it):"
kver=$(uname -r)
kmaj=${kver%%.*}
kmin=${kver#*.}
kmin=${kmin%%[!0-9]*}
if ((kmaj > 5 || (kmaj == 5 && kmin >= 8))); then
  row ok "kernel version" "$kver" ">= 5.8"
else
  row CHANGE "kernel version" "$kver" ">= 5.8"
  changes+=("upgrade the kernel to 5.8 or later (glommio's io_uring requirements)")
fi
disabled=$(read_sysctl kernel.io_uring_disabled)
if [[ -z $disabled ]]; then
  row ok "kernel.io_uring_disabled" "(absent: kernel < 6.6)" "0"
elif [[ $disabled == 0 ]]; then
  row ok "kernel.io_uring_disabled" "$disabled" "0"
else
  row CHANGE "kernel.io_uring_disabled" "$disabled" "0"
  changes+=("sysctl -w kernel.io_uring_disabled=0   # 1 allows only the io_uring_group, 2 disables io_uring")
fi
seccomp=$(awk '/^Seccomp:/ {print $2}' /proc/self/status 2>/dev/null)
container=""
if [[ -f /.dockerenv ]]; then
  container=docker
elif [[ -f /run/.containerenv ]]; then
  container=podman
elif grep -qaE '(docker|containerd|kubepods|libpod)' /proc/1/cgroup 2>/dev/null; then
  container=container
fi
if [[ $seccomp == 2 ]]; then
  row note "seccomp" "filter active${container:+ ($container)}" "must allow io_uring_setup/enter/register"
  notes+=("A seccomp filter is active. Docker (moby >= 25), containerd and Podman default profiles block io_uring:
      run with a profile that allows io_uring_setup, io_uring_enter and io_uring_register
      (docker run --security-opt seccomp=seccomp-io_uring.json ..., built as tuning/README.md shows),
      or --security-opt seccomp=unconfined.")
else
  row ok "seccomp" "${seccomp:-unknown} (0: none)${container:+ ($container)}" "no filter, or one allowing io_uring"
fi

echo "CPUs and interrupts (tuning/README.md, 'CPU and IRQ pinning'):"
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet irqbalance 2>/dev/null; then
  row note "irqbalance" "running" "banned from shard CPUs"
  notes+=("irqbalance is running: set IRQBALANCE_BANNED_CPULIST to the shard CPUs (or stop it and pin NIC IRQs by hand).")
else
  row ok "irqbalance" "not running" "banned from shard CPUs, or stopped"
fi
gov_file=/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor
if [[ -r $gov_file ]]; then
  gov=$(<"$gov_file")
  if [[ $gov == performance ]]; then
    row ok "cpu governor" "$gov" "performance"
  else
    row CHANGE "cpu governor" "$gov" "performance"
    changes+=("cpupower frequency-set -g performance   # frequency ramps add latency to bursts")
  fi
else
  row n/a "cpu governor" "(no cpufreq: VM or fixed)" "performance"
fi
thp_file=/sys/kernel/mm/transparent_hugepage/enabled
if [[ -r $thp_file ]]; then
  thp=$(sed -E 's/.*\[([a-z]+)\].*/\1/' "$thp_file")
  row note "transparent hugepages" "$thp" "madvise or never (either is fine)"
fi

echo
if ((${#changes[@]} == 0)); then
  echo "Nothing to change."
else
  echo "To change (${#changes[@]}):"
  for c in "${changes[@]}"; do
    echo "  - $c"
  done
fi
for n in "${notes[@]}"; do
  echo "  * $n"
done
exit 0
