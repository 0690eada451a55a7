#!/usr/bin/env bash
# The whole keyfab test suite: formatting, lints, every test, and a short run of each
# fuzz target. Installs what it needs when missing, so a fresh machine passes.
set -euo pipefail
cd "$(dirname "$0")/.."

source scripts/needs.sh
keyfab_needs build tests
rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt
rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy

# Each step's heading, with how long the one before it took (the suite has 30 minutes
# on a cold 2-core machine; this shows where they go).
step_started=$SECONDS

# cargo-deny (for the licenses, bans and sources check) is built beside clippy's build,
# which leaves a core idle at times; it is waited for before any test runs, so no test
# shares the machine with it.
deny_log=$(mktemp)
trap 'rm -f "$deny_log"' EXIT
deny_install=""
if ! command -v cargo-deny >/dev/null; then
  cargo install cargo-deny --locked >"$deny_log" 2>&1 &
  deny_install=$!
fi

step() {
  if [ -n "${step_name:-}" ]; then
    echo "   (${step_name}: $((SECONDS - step_started)) s)"
  fi
  step_name=$1
  step_started=$SECONDS
  echo "== $1"
}

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -- -D warnings

step "cargo doc (every crate's documentation builds, its links resolve)"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --quiet

step "cargo-deny built"
if [ -n "$deny_install" ] && ! wait "$deny_install"; then
  cat "$deny_log"
  exit 1
fi

step "cargo test"
cargo test --workspace

step "the end-to-end suite again, HQ and site identity keys in SoftHSM2 tokens"
hsm_dir=$(mktemp -d)
trap 'rm -rf "$hsm_dir" "$deny_log"' EXIT
mkdir -p "$hsm_dir/tokens"
printf 'directories.tokendir = %s/tokens\nobjectstore.backend = file\nlog.level = ERROR\n' "$hsm_dir" >"$hsm_dir/softhsm2.conf"
# --workspace keeps the features of the first run, so nothing is built again.
SOFTHSM2_CONF="$hsm_dir/softhsm2.conf" KEYFAB_TEST_CUSTODY=softhsm cargo test --workspace --test e2e

step "packaging: the Debian package installed in a throwaway root; its systemd unit verified"
pkg_dir=$(mktemp -d)
trap 'rm -rf "$hsm_dir" "$deny_log" "$pkg_dir"' EXIT
# The debug binary the tests built: the packaging is what is checked here.
deb=$(scripts/package-deb.sh target/debug/keyfab "$pkg_dir")
pkg_root="$pkg_dir/root"
mkdir -p "$pkg_root/var/lib/dpkg/updates" "$pkg_root/var/lib/dpkg/info"
touch "$pkg_root/var/lib/dpkg/status"
# An empty root holds none of the packages it depends on: the binary runs on this machine's.
dpkg --root="$pkg_root" --force-depends -i "$deb" 2>&1 | grep -v 'is not installed\|dependency problems\|^ keyfab depends' || true
"$pkg_root/usr/bin/keyfab" --version
"$pkg_root/usr/bin/keyfab" --json demo --dir "$pkg_dir/demo" --devices 10 | jq -e '.steps | length > 30' >/dev/null
for installed in usr/share/bash-completion/completions/keyfab usr/share/zsh/vendor-completions/_keyfab \
  usr/share/fish/vendor_completions.d/keyfab.fish usr/share/man/man1/keyfab-site-serve.1.gz \
  usr/lib/sysusers.d/keyfab.conf; do
  [ -s "$pkg_root/$installed" ] || { echo "the package lacks $installed"; exit 1; }
done
bash -n "$pkg_root/usr/share/bash-completion/completions/keyfab"
# As installed, ExecStart pointing at the package's binary, the manual pages it names
# found: hardening directives and all must parse.
sed "s#/usr/bin/keyfab#$pkg_root/usr/bin/keyfab#" "$pkg_root/usr/lib/systemd/system/keyfab-site.service" \
  >"$pkg_dir/keyfab-site.service"
MANPATH="$pkg_root/usr/share/man" systemd-analyze verify "$pkg_dir/keyfab-site.service"

step "cargo deny check licenses bans sources (deny.toml)"
cargo deny check licenses bans sources 2>&1 | grep -v '^warning\[duplicate\]\|^ *[│├└─]' | tail -n 5

step "fuzz targets (a few seconds each)"
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
step "done"
echo "== all checks passed in $SECONDS s"
