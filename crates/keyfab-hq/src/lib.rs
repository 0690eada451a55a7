//! The HQ engine: the root CA ceremony ([`pki`]), the site registry ([`sites`]) and
//! entitlement issue ([`entitlement`]).
//!
//! Engines never parse bytes by hand nor call primitives directly: files go through
//! `keyfab-formats`, keys through `keyfab-crypto` and `keyfab-custody`.
#![forbid(unsafe_code)]

pub mod audit;
mod device_index;
pub mod entitlement;
pub mod html;
pub mod pki;
pub mod receipts;
pub mod report;
pub mod revoke;
pub mod sites;
