#!/usr/bin/env bash
# Builds every fuzz target once, then runs each for SECONDS (default 30),
# starting from the hand-written seeds in seeds/<target>/. New inputs go to
# corpus/<target>/ and crashes to artifacts/<target>/ (both git-ignored).
# Exits non-zero if any target finds a crash. The run itself is
# tests/fuzz-local, shared with policy/fuzz.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# -max_len just above the longest input the parsers accept (a 16 KiB AUTH
# line), so the cap itself is fuzzed.
exec "$here/../../tests/fuzz-local" "$here" 16384 "${1:-30}"
