#!/usr/bin/env bash
# Builds every fuzz target once, then runs each for SECONDS (default 30),
# starting from the seeds in seeds/<target>/ (regenerate them with
# `cargo test -p relayguard-policy -- --ignored write_fuzz_seeds`). New inputs
# go to corpus/<target>/ and crashes to artifacts/<target>/ (git-ignored).
# Exits non-zero if any target finds a crash. The run itself is
# tests/fuzz-local, shared with gateway/fuzz.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# -max_len just above the 64 KiB message cap, so the cap itself is fuzzed.
exec "$here/../../tests/fuzz-local" "$here" 65600 "${1:-30}"
