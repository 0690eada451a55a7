# Installs what keyfab's scripts need when it is missing, so a fresh Debian machine
# runs them. Sourced, not run: `keyfab_needs build` for what compiling keyfab takes,
# `keyfab_needs build tests` for the test suite's real peers as well.

keyfab_needs() {
  local need_apt=()
  local what
  for what in "$@"; do
    case "$what" in
    build)
      command -v cc >/dev/null || need_apt+=(build-essential)
      # The etcd backend's client crate generates its gRPC code with protoc.
      command -v protoc >/dev/null || need_apt+=(protobuf-compiler)
      # The TPM rollback counter links the TCG TSS (tpm2-tss), found with pkg-config.
      command -v pkg-config >/dev/null || need_apt+=(pkg-config)
      pkg-config --exists tss2-esys 2>/dev/null || need_apt+=(libtss2-dev)
      ;;
    tests)
      command -v openssl >/dev/null || need_apt+=(openssl)
      # README.md's journey, run as written by the suite, reads an id with jq.
      command -v jq >/dev/null || need_apt+=(jq)
      # The etcd backend is tested against a real etcd.
      command -v etcd >/dev/null || need_apt+=(etcd-server etcd-client)
      # HSM custody is tested against a real PKCS#11 token: SoftHSM2.
      [ -e /usr/lib/softhsm/libsofthsm2.so ] || need_apt+=(softhsm2)
      # The packaging check verifies the systemd unit and builds a Debian package.
      command -v systemd-analyze >/dev/null || need_apt+=(systemd)
      command -v dpkg-deb >/dev/null || need_apt+=(dpkg)
      # /metrics is linted by Prometheus's own promtool.
      command -v promtool >/dev/null || need_apt+=(prometheus)
      # The TPM rollback counter is tested against a TPM 2.0 simulator.
      command -v swtpm >/dev/null || need_apt+=(swtpm)
      command -v tpm2_nvread >/dev/null || need_apt+=(tpm2-tools)
      ;;
    *)
      echo "keyfab_needs: unknown need '$what'" >&2
      return 2
      ;;
    esac
  done
  if ((${#need_apt[@]})); then
    echo "== installing ${need_apt[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}"
  fi
}
