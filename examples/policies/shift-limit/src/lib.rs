//! keyfab policy module: no more than 500 devices per shift.
//!
//! Shifts follow the policy's local time: early 06:00–14:00, late 14:00–22:00, night
//! 22:00–06:00 (the night shift belongs to the day it starts). The count lives in the
//! module's state under the key `shift`: the shift's day (i64), its number (u8) and the
//! devices allowed in it so far (u32), little-endian — 13 bytes. A new shift starts
//! from zero. The built-in daily limit and quota still apply first.
//!
//! Build: `./build.sh` (needs the `wasm32-unknown-unknown` target); the result is
//! committed as `shift-limit.wasm` so nothing else needs that target.
#![no_std]

/// Devices one shift may provision.
const LIMIT: u32 = 500;
const HOUR: i64 = 3600;

mod host {
    //! The keyfab host API (docs/POLICY-CODE.md), wrapped in safe functions.

    #[link(wasm_import_module = "keyfab")]
    extern "C" {
        fn input(id: i32) -> i64;
        fn state_get(key: *const u8, key_len: i32, out: *mut u8, cap: i32) -> i32;
        fn state_set(key: *const u8, key_len: i32, value: *const u8, len: i32) -> i32;
        fn deny_reason(text: *const u8, len: i32) -> i32;
    }

    pub const LOCAL_DAY: i32 = 1;
    pub const LOCAL_SECOND: i32 = 2;

    pub fn read(id: i32) -> i64 {
        // SAFETY: a host function taking and returning plain integers.
        unsafe { input(id) }
    }

    /// The value under `key` copied into `out`; its full length, or `None` if absent.
    pub fn get(key: &[u8], out: &mut [u8]) -> Option<usize> {
        // SAFETY: both buffers are valid for the lengths passed; the host writes at most
        // `out.len()` bytes.
        let n = unsafe {
            state_get(
                key.as_ptr(),
                key.len() as i32,
                out.as_mut_ptr(),
                out.len() as i32,
            )
        };
        usize::try_from(n).ok()
    }

    pub fn set(key: &[u8], value: &[u8]) {
        // SAFETY: both buffers are valid for the lengths passed; the host only reads.
        unsafe {
            state_set(
                key.as_ptr(),
                key.len() as i32,
                value.as_ptr(),
                value.len() as i32,
            );
        }
    }

    pub fn deny(reason: &str) -> i32 {
        // SAFETY: the buffer is valid for its length; the host only reads.
        unsafe { deny_reason(reason.as_ptr(), reason.len() as i32) };
        1
    }
}

/// The shift a local time falls in: (the day it started, 0 early | 1 late | 2 night).
fn shift_of(day: i64, second: i64) -> (i64, u8) {
    match second {
        s if s < 6 * HOUR => (day - 1, 2),
        s if s < 14 * HOUR => (day, 0),
        s if s < 22 * HOUR => (day, 1),
        _ => (day, 2),
    }
}

#[no_mangle]
pub extern "C" fn decide() -> i32 {
    let (day, shift) = shift_of(host::read(host::LOCAL_DAY), host::read(host::LOCAL_SECOND));
    let mut record = [0u8; 13];
    let mut count = 0u32;
    if host::get(b"shift", &mut record) == Some(13)
        && record[..8] == day.to_le_bytes()
        && record[8] == shift
    {
        let mut n = [0u8; 4];
        n.copy_from_slice(&record[9..]);
        count = u32::from_le_bytes(n);
    }
    if count >= LIMIT {
        return host::deny("500 devices this shift already");
    }
    record[..8].copy_from_slice(&day.to_le_bytes());
    record[8] = shift;
    record[9..].copy_from_slice(&(count + 1).to_le_bytes());
    host::set(b"shift", &record);
    0
}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    core::arch::wasm32::unreachable()
}
