#!/usr/bin/env bash
# Builds the Debian package of keyfab: the binary, its manual pages and shell
# completions (made by the binary itself), the systemd unit of `site serve` and its
# user. Usage: scripts/package-deb.sh [BINARY] [OUT_DIR]
#   BINARY   default target/release/keyfab, built first if missing
#   OUT_DIR  default target/debian; the package is OUT_DIR/keyfab_VERSION_ARCH.deb
set -euo pipefail
cd "$(dirname "$0")/.."

bin=${1:-target/release/keyfab}
out=${2:-target/debian}
if [ ! -x "$bin" ]; then
  source scripts/needs.sh
  keyfab_needs build
  cargo build --release -p keyfab
fi
version=$("$bin" --version | awk '{print $2}')
arch=$(dpkg --print-architecture)
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT

install -D -m 0755 "$bin" "$stage/usr/bin/keyfab"
install -D -m 0644 packaging/systemd/keyfab-site.service "$stage/usr/lib/systemd/system/keyfab-site.service"
install -D -m 0644 packaging/sysusers.d/keyfab.conf "$stage/usr/lib/sysusers.d/keyfab.conf"
"$bin" man --out "$stage/usr/share/man/man1" >/dev/null
gzip -9n "$stage"/usr/share/man/man1/*.1
install -d "$stage/usr/share/bash-completion/completions" "$stage/usr/share/zsh/vendor-completions" \
  "$stage/usr/share/fish/vendor_completions.d"
"$bin" completions bash >"$stage/usr/share/bash-completion/completions/keyfab"
"$bin" completions zsh >"$stage/usr/share/zsh/vendor-completions/_keyfab"
"$bin" completions fish >"$stage/usr/share/fish/vendor_completions.d/keyfab.fish"
install -D -m 0644 README.md "$stage/usr/share/doc/keyfab/README.md"
install -D -m 0644 SECURITY.md "$stage/usr/share/doc/keyfab/SECURITY.md"
{
  echo "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/"
  echo "Upstream-Name: keyfab"
  echo "Source: https://github.com/keyfab/keyfab"
  echo
  echo "Files: *"
  echo "License: Apache-2.0"
  echo " On Debian systems the full text is in /usr/share/common-licenses/Apache-2.0;"
  echo " it is also the LICENSE file of the source."
} >"$stage/usr/share/doc/keyfab/copyright"

install -d "$stage/DEBIAN"
size=$(du -sk --exclude=DEBIAN "$stage" | cut -f1)
cat >"$stage/DEBIAN/control" <<CONTROL
Package: keyfab
Version: $version
Architecture: $arch
Maintainer: keyfab maintainers <keyfab@users.noreply.github.com>
Installed-Size: $size
Depends: libc6, libtss2-esys-3.0.2-0, libtss2-tctildr0
Recommends: libtss2-tcti-device0
Suggests: etcd-server, softhsm2, swtpm
Section: admin
Priority: optional
Homepage: https://github.com/keyfab/keyfab
Description: secure-manufacturing key injection
 HQ decides which keys exist and under which policy; a factory site provisions
 them into devices within that policy, offline; HQ receives signed, encrypted,
 tamper-evident proof of what the site did. Includes the systemd unit of
 keyfab site serve (keyfab-site.service) and its user (sysusers.d).
CONTROL

mkdir -p "$out"
deb="$out/keyfab_${version}_${arch}.deb"
dpkg-deb --root-owner-group -Zxz --build "$stage" "$deb" >/dev/null
echo "$deb"
