#!/usr/bin/env bash
# Short fuzz run of every parser target (issue 7): builds the cargo-fuzz project in fuzz/ with
# libFuzzer + AddressSanitizer, runs each target for FUZZ_SECONDS (default 20) on a scratch copy
# of its committed seed corpus plus the regression inputs, and exits non-zero if any target
# crashes, hangs (an input over 10 s), or allocates without bound (one allocation over 256 MiB,
# or RSS over 2 GiB). Crash inputs land in fuzz/artifacts/<target>/.
#
# No nightly toolchain is needed: RUSTC_BOOTSTRAP=1 lets stable accept the -Z flags cargo-fuzz
# passes. Environment:
#   FUZZ_SECONDS=20           time per target
#   FUZZ_TARGETS="jwt config" only these targets (default: all of fuzz/fuzz_targets)
#
# Long runs (10 minutes and more per target) are the same binaries; see SECURITY.md
# ("Fuzzing") for the command and the figures of the last long run.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

export RUSTC_BOOTSTRAP=1
export CARGO_TERM_COLOR=never
seconds="${FUZZ_SECONDS:-20}"

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "cargo-fuzz is missing; installing it (cargo install cargo-fuzz)"
    cargo install cargo-fuzz
fi

targets="${FUZZ_TARGETS:-$(cargo fuzz list)}"
build_start=$SECONDS
if [ -z "${FUZZ_TARGETS:-}" ]; then
    cargo fuzz build 2>&1 | tail -n 3
else
    for t in $targets; do cargo fuzz build "$t" 2>&1 | tail -n 3; done
fi
echo "build: $((SECONDS - build_start)) s"

bin_dir="target/x86_64-unknown-linux-gnu/release"
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
failed=()

# The stable replay of the oracles, seeds and regressions (no sanitizer, no libFuzzer).
if cargo test --quiet >"$scratch/test.log" 2>&1; then
    echo "replay: oracles, seed corpora and regression inputs pass"
else
    failed+=("replay")
    tail -n 40 "$scratch/test.log"
fi
for t in $targets; do
    mkdir -p "$scratch/$t" "artifacts/$t"
    log="$scratch/$t.log"
    start=$SECONDS
    status=0
    # The first folder receives new inputs; the committed ones are only read.
    "$bin_dir/$t" "$scratch/$t" "corpus/$t" $( [ -d "regressions/$t" ] && echo "regressions/$t" ) \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -malloc_limit_mb=256 \
        -artifact_prefix="artifacts/$t/" -print_final_stats=1 >"$log" 2>&1 || status=$?
    last="$(grep -E '^#[0-9]+' "$log" | tail -n 1 || true)"
    execs="$(grep -E '^stat::number_of_executed_units' "$log" | awk '{print $2}' || true)"
    printf '%-17s %3d s  execs %-9s %s\n' "$t" "$((SECONDS - start))" "${execs:-?}" \
        "$(echo "$last" | grep -oE 'cov: [0-9]+ ft: [0-9]+' || echo 'no coverage line')"
    if [ "$status" -ne 0 ]; then
        failed+=("$t")
        echo "---- $t failed (exit $status); last lines:"
        grep -vE '^#[0-9]+' "$log" | tail -n 40
        echo "---- reproduce: cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run $t artifacts/$t/<file>"
    fi
done

if [ "${#failed[@]}" -gt 0 ]; then
    echo "fuzz: FAILED: ${failed[*]}"
    exit 1
fi
echo "fuzz: every target ran ${seconds} s without a crash"
