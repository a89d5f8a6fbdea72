#!/usr/bin/env bash
# Builds every fuzz target and runs each for SECONDS (default 30), starting
# from the hand-written seeds in seeds/<target>/. New inputs go to
# corpus/<target>/ and crashes to artifacts/<target>/ (both git-ignored).
#
# cargo-fuzz needs nightly-only rustc flags (-Zsanitizer, coverage); on a
# stable toolchain RUSTC_BOOTSTRAP=1 unlocks them.
set -euo pipefail

seconds="${1:-30}"
cd "$(dirname "$0")"
export RUSTC_BOOTSTRAP="${RUSTC_BOOTSTRAP:-1}"

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "cargo-fuzz is not installed: cargo install cargo-fuzz" >&2
    exit 1
fi

cargo fuzz build
status=0
for target in $(cargo fuzz list); do
    echo "=== $target (${seconds}s)"
    mkdir -p "corpus/$target"
    if ! cargo fuzz run "$target" "corpus/$target" "seeds/$target" -- \
        -max_total_time="$seconds" -max_len=16384 -timeout=10 -rss_limit_mb=2048 -print_final_stats=1; then
        echo "=== $target FAILED" >&2
        status=1
    fi
done
exit "$status"
