//! The site engine: its identity file ([`identity`]), entitlement import and listing
//! ([`entitlements`]), and provisioning ([`provision`]).
#![forbid(unsafe_code)]

pub mod approvals;
mod audit_log;
pub mod bundle;
pub mod checkpoints;
pub mod entitlements;
pub mod export;
pub mod identity;
pub mod latch;
pub mod provision;
pub mod revocation;
pub mod server;
pub mod settings;
pub mod stations;
