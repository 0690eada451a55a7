#!/usr/bin/env bash
# The whole keyfab test suite: formatting, lints, every test, and a short run of each
# fuzz target. Installs what it needs when missing, so a fresh machine passes.
set -euo pipefail
cd "$(dirname "$0")/.."

source scripts/needs.sh
keyfab_needs build tests
rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt
rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -- -D warnings

echo "== cargo doc (every crate's documentation builds, its links resolve)"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --quiet

echo "== cargo test"
cargo test --workspace

echo "== the end-to-end suite again, HQ and site identity keys in SoftHSM2 tokens"
hsm_dir=$(mktemp -d)
trap 'rm -rf "$hsm_dir"' EXIT
mkdir -p "$hsm_dir/tokens"
printf 'directories.tokendir = %s/tokens\nobjectstore.backend = file\nlog.level = ERROR\n' "$hsm_dir" >"$hsm_dir/softhsm2.conf"
SOFTHSM2_CONF="$hsm_dir/softhsm2.conf" KEYFAB_TEST_CUSTODY=softhsm cargo test -p keyfab

echo "== fuzz targets (a few seconds each)"
# cargo-fuzz needs nightly features: use the nightly toolchain when the machine has one,
# otherwise the stable compiler with RUSTC_BOOTSTRAP=1.
if cargo +nightly --version >/dev/null 2>&1; then
  fuzz=(cargo +nightly fuzz)
else
  export RUSTC_BOOTSTRAP=1
  fuzz=(cargo fuzz)
fi
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
for t in $("${fuzz[@]}" list); do
  echo "-- $t"
  mkdir -p "fuzz/corpus/$t"
  "${fuzz[@]}" run "$t" "fuzz/corpus/$t" "fuzz/seeds/$t" -- \
    -max_total_time="${FUZZ_SECONDS:-5}" -rss_limit_mb=2048 2>&1 | tail -n 2
done
echo "== all checks passed"
