//! systemd's readiness protocol (sd_notify(3)): one datagram per state to the socket
//! `NOTIFY_SOCKET` names, so that a unit with `Type=notify` counts `site serve` as
//! started only once it is unsealed and accepts stations — not while it waits for
//! unseal shares, whose progress it reads as the unit's status — and learns when it has
//! stopped serving. Without `NOTIFY_SOCKET` (not under systemd) nothing is sent.

use std::os::unix::net::UnixDatagram;

/// Sends `state` (`READY=1`, `STATUS=…`, `STOPPING=1`, newline-separated) to systemd,
/// if it is listening. A socket that cannot be reached is ignored: readiness is advice
/// to the service manager, never a reason to stop serving.
pub(crate) fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let Ok(socket) = UnixDatagram::unbound() else {
        return;
    };
    // `@name` is a socket in the abstract namespace (Linux).
    let _ = match path.as_encoded_bytes().strip_prefix(b"@") {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            std::os::unix::net::SocketAddr::from_abstract_name(name)
                .and_then(|addr| socket.send_to_addr(state.as_bytes(), &addr))
        }
        None => socket.send_to(state.as_bytes(), std::path::Path::new(&path)),
    };
}
