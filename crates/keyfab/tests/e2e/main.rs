//! keyfab's end-to-end suite as one test binary: the real engines and the real `keyfab`
//! binary, each area in its own module. One binary links once instead of once per area,
//! which keeps the build's disk use and link time small.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed step stops the test, with what broke"
)]

mod common;

mod approval;
#[cfg(feature = "bench")]
mod bench;
mod certificates;
mod chips;
mod cluster;
mod crash;
mod demo;
mod edges;
mod entitlement;
mod help;
mod mutants;
mod packaging;
mod policy_code;
mod provision;
mod readme;
mod return_path;
mod revocation;
mod rollback;
mod rotation;
mod serve;
mod served;
mod tamper;
mod tpm_counter;
mod vectors;
