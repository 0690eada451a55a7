// Shared by the targets: the committed vector root and the time the vectors were made.
use keyfab_crypto::time::UnixTime;

pub const NOW: UnixTime = UnixTime(1_795_564_800); // 2026-11-25T00:00:00Z

pub fn root() -> Vec<u8> {
    keyfab_crypto::x509::from_pem(include_str!("../../tests/vectors/root/root.crt"), "CERTIFICATE")
        .expect("committed root")
}
