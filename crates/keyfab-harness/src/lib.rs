//! Real parts for tests and benchmarks, kept out of the libraries a production build
//! links: [`etcd`] starts a real etcd cluster on loopback (members that can be killed,
//! paused and restarted), [`swtpm`] a TPM 2.0 simulator on loopback, [`raw`] measures the rate of the bare cryptography a
//! benchmark compares keyfab with. The `keyfab` program links this crate only with its
//! `bench` feature; tests link it as a dev-dependency.
#![forbid(unsafe_code)]

pub mod etcd;
pub mod raw;
pub mod swtpm;
