#!/usr/bin/env bash
# Builds every fuzz target once, then runs each for SECONDS (default 30),
# starting from the hand-written seeds in seeds/<target>/. New inputs go to
# corpus/<target>/ and crashes to artifacts/<target>/ (both git-ignored).
# Exits non-zero if any target finds a crash.
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

# One build for all targets, so every run tests the same source snapshot.
cargo fuzz build
host="$(rustc -vV | sed -n 's/^host: //p')"
bin_dir="target/$host/release"
# cargo-fuzz sets this when it runs a target itself.
export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_odr_violation=0}"

status=0
for target in $(cargo fuzz list); do
    echo "=== $target (${seconds}s)"
    mkdir -p "corpus/$target" "artifacts/$target"
    if ! "$bin_dir/$target" "corpus/$target" "seeds/$target" \
        -artifact_prefix="artifacts/$target/" -max_total_time="$seconds" \
        -max_len=16384 -timeout=10 -rss_limit_mb=2048 -print_final_stats=1; then
        echo "=== $target FAILED, see artifacts/$target/" >&2
        status=1
    fi
done
exit "$status"
