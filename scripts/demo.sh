#!/usr/bin/env bash
# `keyfab demo` on a fresh machine: installs what building keyfab needs when it is
# missing, then runs the whole journey (arguments go to `keyfab demo`, e.g. --dir DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/needs.sh
keyfab_needs build
exec cargo run --release -p keyfab -- demo "$@"
