#!/usr/bin/env bash
# Runs every fuzz target for SECONDS each (default 20), one process at a time, with cargo-fuzz
# (installed when missing). New inputs go to fuzz/target/corpus/<target>/ (ignored
# by git); the committed seeds in fuzz/corpus/<target>/ are only read. A crash, a panic, an
# abort, a timeout or an out-of-memory is saved under fuzz/artifacts/<target>/ and makes the
# script exit non-zero after the other targets ran. One summary line per target.
#
#   bash fuzz/run.sh [SECONDS] [TARGET...] [-libfuzzer_flag=...]
#   bash fuzz/run.sh 0 headfile -runs=1000000     # a fixed number of inputs instead of a time
#   FUZZ_KEEP_GOING=1 bash fuzz/run.sh 600 image  # record every finding and go on (libFuzzer's
#                                                 # fork mode, one child at a time)
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never

secs=${1:-20}
shift || true
targets=()
while [ $# -gt 0 ] && [[ $1 != -* ]]; do
    targets+=("$1")
    shift
done
extra=("$@")   # more libFuzzer flags, e.g. -runs=N

# cargo-fuzz needs nightly features (-Zsanitizer): a nightly toolchain when there is one, else
# the stable one with RUSTC_BOOTSTRAP=1 (its rust-std ships the sanitizer runtimes), so a
# machine that cannot fetch toolchains still fuzzes.
if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
    tc=(+nightly)
else
    tc=()
    export RUSTC_BOOTSTRAP=1
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --version 0.13.2 --locked
fi

# -a: debug assertions (integer overflow panics) on, as in the test build; AddressSanitizer is
# cargo-fuzz's default. `run` below uses the same flags, so it does not rebuild.
build_start=$(date +%s)
cargo "${tc[@]}" fuzz build -a
echo "fuzz: build took $(( $(date +%s) - build_start ))s"
if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets < <(cargo "${tc[@]}" fuzz list)
fi

failed=()
for t in "${targets[@]}"; do
    work=fuzz/target/corpus/$t
    arts=fuzz/artifacts/$t
    mkdir -p "$work" "$arts"
    before=$(find "$arts" -type f | wc -l)
    limits=(-rss_limit_mb=2048 -timeout=20)
    # Decoding is where a few bytes can ask for gigabytes: every allocation is held to 2 GB.
    # A few bytes can also declare a picture at graft's size limits (16384 px a side, 1 GiB
    # decoded): a 32-byte WebP of 16202x11284 took 23 s here under AddressSanitizer. Such a
    # picture is allowed, so only a minute or more counts as a hang, and a slow input is no
    # finding.
    [ "$t" = image ] && limits=(-rss_limit_mb=2048 -malloc_limit_mb=2048 -timeout=60 -report_slow_units=60)
    mode=()
    [ -n "${FUZZ_KEEP_GOING:-}" ] && mode=(-fork=1 -ignore_crashes=1 -ignore_ooms=1 -ignore_timeouts=1)
    time_flag=()
    [ "$secs" != 0 ] && time_flag=(-max_total_time="$secs")
    log=fuzz/target/$t.log
    start=$(date +%s)
    status=ok
    cargo "${tc[@]}" fuzz run -a "$t" "$work" "fuzz/corpus/$t" -- \
        "${mode[@]}" "${time_flag[@]}" "${limits[@]}" -print_final_stats=1 \
        "${extra[@]}" >"$log" 2>&1 || status=FAILED
    found=$(( $(find "$arts" -type f | wc -l) - before ))
    if [ "$status" != ok ] || [ "$found" -gt 0 ]; then
        status="FAILED ($found new inputs in $arts)"
        failed+=("$t")
        grep -E 'panicked at|ERROR: libFuzzer|ERROR: AddressSanitizer' "$log" | sort | uniq -c | head -5 || true
    fi
    # Plain mode prints final stats; fork mode a "#RUNS: ... exec/s: N" line per job.
    runs=$(grep -oE 'stat::number_of_executed_units: *[0-9]+' "$log" | grep -oE '[0-9]+$' | tail -1)
    [ -n "${FUZZ_KEEP_GOING:-}" ] && runs=$(grep -oE '^#[0-9]+:' "$log" | tr -d '#:' | tail -1)
    took=$(( $(date +%s) - start ))
    rss=$(grep -oE 'stat::peak_rss_mb: *[0-9]+' "$log" | grep -oE '[0-9]+$' | sort -n | tail -1)
    echo "fuzz: $t $status: ${runs:-?} inputs in ${took}s ($(( ${runs:-0} / (took > 0 ? took : 1) ))/s, peak RSS ${rss:-?} MB; log $log)"
done
if [ ${#failed[@]} -gt 0 ]; then
    echo "fuzz: findings in ${failed[*]}: inputs under fuzz/artifacts/" >&2
    exit 1
fi
