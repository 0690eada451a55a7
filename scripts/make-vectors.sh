#!/usr/bin/env bash
# Regenerates the committed test vectors in tests/vectors/ (run from the repository root).
# Every defect file is derived from one valid file; expected.txt lists each file's code.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build -q -p keyfab
kf() { ./target/debug/keyfab "$@" >/dev/null; }
out=tests/vectors
rm -rf "$out" && mkdir -p "$out"
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
export KEYFAB_PASSPHRASE="keyfab test vectors"
export KEYFAB_NOW="2026-11-25T00:00:00Z"

kf pki init-root --home "$work/root" --subject "CN=Vector Root,O=keyfab"
kf pki init-root --home "$work/foreign" --subject "CN=Foreign Root,O=elsewhere"
node() { # root kind name
  kf "$2" init --home "$work/$3" --name "$3"
  kf pki issue --home "$work/$1" --csr "$work/$3/cluster.csr" --role "$2" --out "$work/$3.crt"
  kf "$2" install-cert --home "$work/$3" --cert "$work/$3.crt" --root-cert "$work/$1/root.crt"
}
node root hq vector-hq
node root site vector-site
node root site other-site
node foreign hq foreign-hq
node foreign site foreign-site
for s in vector-site other-site foreign-site; do kf site identity export --home "$work/$s" --out "$work/$s.kfi"; done
kf hq site add --home "$work/vector-hq" "$work/vector-site.kfi"
kf hq site add --home "$work/vector-hq" "$work/other-site.kfi"
kf hq site add --home "$work/foreign-hq" "$work/foreign-site.kfi"
cp "$work/vector-site.kfi" "$work/vector-site-for-foreign.kfi"

cat > "$work/policy.toml" <<'TOML'
product = "vector"
devices = 3
valid_from  = "2026-01-01T00:00:00Z"
valid_until = "2027-01-01T00:00:00Z"
[[keys]]
name = "identity"
type = "ec-p256"
source = "hq-pool"
TOML
kf hq entitlement create --home "$work/vector-hq" --site vector-site --policy "$work/policy.toml" --out "$out/valid.kfe"
kf hq entitlement create --home "$work/vector-hq" --site other-site --policy "$work/policy.toml" --out "$out/wrong_recipient.kfe"
# An entitlement whose policy carries a module (WAT, assembled by HQ): policy code.
cat > "$work/rules.wat" <<'WAT'
(module
  (import "keyfab" "input" (func $input (param i32) (result i64)))
  (memory (export "memory") 1)
  (func (export "decide") (result i32)
    (if (i64.ge_u (call $input (i32.const 4)) (i64.const 2)) (then (return (i32.const 1))))
    (i32.const 0)))
WAT
cp "$work/policy.toml" "$work/code.toml"
printf '[code]\nmodule = "rules.wat"\n' >> "$work/code.toml"
kf hq entitlement create --home "$work/vector-hq" --site vector-site --policy "$work/code.toml" --out "$out/code.kfe"
# The foreign HQ addresses our site under the same name, with a key it was handed.
kf site init --home "$work/shadow" --name vector-site
kf pki issue --home "$work/foreign" --csr "$work/shadow/cluster.csr" --role site --out "$work/shadow.crt"
kf site install-cert --home "$work/shadow" --cert "$work/shadow.crt" --root-cert "$work/foreign/root.crt"
kf site identity export --home "$work/shadow" --out "$work/shadow.kfi"
kf hq site add --home "$work/foreign-hq" "$work/shadow.kfi"
kf hq entitlement create --home "$work/foreign-hq" --site vector-site --policy "$work/policy.toml" --out "$out/foreign_root.kfe"

python3 - "$out" <<'PY'
import sys, pathlib
out = pathlib.Path(sys.argv[1]); v = (out / "valid.kfe").read_bytes()
(out / "trailing_bytes.kfe").write_bytes(v + b"\0")
(out / "truncated.kfe").write_bytes(v[:-1])
(out / "version_2.kfe").write_bytes(v[:7] + b"\x02" + v[8:])
(out / "not_keyfab.kfe").write_bytes(b"PK\x03\x04" + v[4:])
(out / "body_flipped.kfe").write_bytes(v[:-5] + bytes([v[-5] ^ 1]) + v[-4:])
sig_end = 12 + int.from_bytes(v[8:12], "big")
(out / "signature_flipped.kfe").write_bytes(v[:sig_end - 3] + bytes([v[sig_end - 3] ^ 1]) + v[sig_end - 2:])
(out / "sign1_length_huge.kfe").write_bytes(v[:8] + (0xFFFFFFFF).to_bytes(4, "big") + v[12:])
c = (out / "code.kfe").read_bytes()  # the module lives in the encrypted content
(out / "code_flipped.kfe").write_bytes(c[:len(c) // 2] + bytes([c[len(c) // 2] ^ 1]) + c[len(c) // 2 + 1:])
PY
cp "$work/vector-site.kfi" "$out/valid.kfi"
cp "$work/foreign-site.kfi" "$out/foreign_root.kfi"
python3 - "$out" <<'PY'
import sys, pathlib
out = pathlib.Path(sys.argv[1]); v = (out / "valid.kfi").read_bytes()
(out / "trailing_bytes.kfi").write_bytes(v + b"\0")
(out / "truncated.kfi").write_bytes(v[:-1])
(out / "version_2.kfi").write_bytes(v[:7] + b"\x02" + v[8:])
(out / "signature_flipped.kfi").write_bytes(v[:-3] + bytes([v[-3] ^ 1]) + v[-2:])
PY
mkdir -p "$out/root" "$out/hq" "$out/site"
cp "$work/root/root.crt" "$out/root/"
cp "$work/vector-hq/keystore.kfs" "$work/vector-hq/state.redb" "$out/hq/"
cp "$work/vector-site/keystore.kfs" "$work/vector-site/state.redb" "$out/site/"
# The return path: the site uses valid.kfe and exports its log (valid.kfa); HQ's receipt
# for it (valid.kfk), and a revocation of the entitlement (valid.kfr). site-exported/ is
# the site as it was right after the export, where the receipt and revocation apply.
kf site entitlement import --home "$work/vector-site" "$out/valid.kfe"
ent=$(./target/debug/keyfab --json site entitlement list --home "$work/vector-site" | python3 -c 'import json,sys; print(json.load(sys.stdin)["entitlements"][0]["id"])')
kf site provision --home "$work/vector-site" --entitlement "$ent" --device-id V-0001 --request-id vector-1
kf site audit export --home "$work/vector-site" --out "$out/valid.kfa"
mkdir -p "$out/site-exported"
cp "$work/vector-site/keystore.kfs" "$work/vector-site/state.redb" "$out/site-exported/"
kf hq audit import --home "$work/vector-hq" "$out/valid.kfa" --receipt-out "$out/valid.kfk"
kf hq entitlement revoke --home "$work/vector-hq" --id "$ent" --reason "vector" --out "$out/valid.kfr"
python3 - "$out" <<'PY'
import sys, pathlib
out = pathlib.Path(sys.argv[1])
def common(ext):
    v = (out / f"valid.{ext}").read_bytes()
    (out / f"trailing_bytes.{ext}").write_bytes(v + b"\0")
    (out / f"truncated.{ext}").write_bytes(v[:-1])
    (out / f"version_2.{ext}").write_bytes(v[:7] + b"\x02" + v[8:])
    return v
v = common("kfa")
(out / "body_flipped.kfa").write_bytes(v[:-5] + bytes([v[-5] ^ 1]) + v[-4:])
sig_end = 12 + int.from_bytes(v[8:12], "big")
(out / "signature_flipped.kfa").write_bytes(v[:sig_end - 3] + bytes([v[sig_end - 3] ^ 1]) + v[sig_end - 2:])
for ext in ("kfk", "kfr"):
    v = common(ext)
    (out / f"signature_flipped.{ext}").write_bytes(v[:-3] + bytes([v[-3] ^ 1]) + v[-2:])
PY
cat > "$out/expected.txt" <<'TXT'
# file                    command      code (exit 4 unless "ok")   kind (of malformed)
valid.kfe                 import       ok                          -
trailing_bytes.kfe        import       malformed                   trailing_bytes
truncated.kfe             import       malformed                   truncated
version_2.kfe             import       malformed                   unsupported_version
not_keyfab.kfe            import       malformed                   not_keyfab
body_flipped.kfe          import       bad_signature               -
signature_flipped.kfe     import       bad_signature               -
sign1_length_huge.kfe     import       malformed                   field
wrong_recipient.kfe       import       wrong_recipient             -
foreign_root.kfe          import       untrusted_signer            -
code_flipped.kfe          import       bad_signature               -
code.kfe                  import       ok                          -
valid.kfi                 site-add     ok                          -
trailing_bytes.kfi        site-add     malformed                   trailing_bytes
truncated.kfi             site-add     malformed                   truncated
version_2.kfi             site-add     malformed                   unsupported_version
signature_flipped.kfi     site-add     bad_signature               -
foreign_root.kfi          site-add     untrusted_signer            -
trailing_bytes.kfa        hq-audit     malformed                   trailing_bytes
truncated.kfa             hq-audit     malformed                   truncated
version_2.kfa             hq-audit     malformed                   unsupported_version
body_flipped.kfa          hq-audit     bad_signature               -
signature_flipped.kfa     hq-audit     bad_signature               -
valid.kfa                 hq-audit     ok                          -
valid.kfa                 hq-audit     replayed                    -
trailing_bytes.kfk        receipt      malformed                   trailing_bytes
truncated.kfk             receipt      malformed                   truncated
version_2.kfk             receipt      malformed                   unsupported_version
signature_flipped.kfk     receipt      bad_signature               -
valid.kfk                 receipt      ok                          -
trailing_bytes.kfr        revoke       malformed                   trailing_bytes
truncated.kfr             revoke       malformed                   truncated
version_2.kfr             revoke       malformed                   unsupported_version
signature_flipped.kfr     revoke       bad_signature               -
valid.kfr                 revoke       ok                          -
valid.kfr                 revoke       replayed                    -
TXT
# Seeds for the fuzz targets of the smaller formats.
seeds=fuzz/seeds
mkdir -p "$seeds/approval" "$seeds/revocation" "$seeds/receipt" "$seeds/kfe" "$seeds/kfi"
kf approver keygen --out "$work/approver"
cp "$work/approver.pub" "$seeds/approver.pub"
cat > "$work/gated.toml" <<'TOML'
product = "gated"
devices = 2
valid_from  = "2026-01-01T00:00:00Z"
valid_until = "2027-01-01T00:00:00Z"
[[keys]]
name = "k"
type = "aes-256"
source = "derived"
[approval]
threshold = 1
approvers = ["approver.pub"]
TOML
gated=$(./target/debug/keyfab --json hq entitlement create --home "$work/vector-hq" --site vector-site --policy "$work/gated.toml" --out "$work/gated.kfe" | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
kf site entitlement import --home "$work/vector-site" "$work/gated.kfe"
kf site approval request --home "$work/vector-site" --entitlement "$gated" --action activate --out "$seeds/approval/request.kfq"
kf approver sign --key "$work/approver.key" "$seeds/approval/request.kfq" --out "$seeds/approval/approval.kfp"
kf hq entitlement revoke --home "$work/vector-hq" --id "$gated" --out "$seeds/revocation/valid.kfr"
kf site audit checkpoint --home "$work/vector-site" --out "$seeds/receipt/checkpoint.kfc"
mkdir -p "$seeds/kfa"
kf site audit export --home "$work/vector-site" --out "$seeds/kfa/valid.kfa"
cp "$out/valid.kfe" "$seeds/kfe/valid.kfe"
cp "$out/valid.kfk" "$seeds/receipt/valid.kfk"
kf hq site reset-clock --home "$work/vector-hq" --site vector-site --out "$seeds/receipt/reset.kfk"
cp "$out/valid.kfi" "$seeds/kfi/valid.kfi"
echo "vectors written to $out"; ls -la "$out" | head -40
