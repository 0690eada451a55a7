//! The site engine. Its modules, each with one job:
//!
//! - [`identity`]: the site's identity file for HQ, and the rotation of its keys;
//! - [`entitlements`]: entitlements from HQ, verified and imported, and listed;
//! - [`revocation`]: HQ's revocations, applied (unused pool keys destroyed);
//! - [`approvals`]: quorum approvals asked for and submitted;
//! - [`provision`]: the decide-and-record engine — every decision recorded before any
//!   key leaves;
//! - [`stations`], [`server`]: the production line's stations and the station API over
//!   mutual TLS;
//! - [`export`], [`bundle`]: the audit log exported for HQ;
//! - [`checkpoints`]: signed checkpoints, HQ's receipts and clock resets, rollback
//!   detection;
//! - [`latch`]: the site stopping itself when its state is behind HQ's or its log
//!   broken;
//! - [`settings`]: settings that bear on security (the clock's bounds), audited;
//! - `audit_log`: the audit log in the store — appending, reading in commit order.
#![forbid(unsafe_code)]

pub mod approvals;
mod audit_log;
pub mod batch_key;
pub mod bundle;
pub mod checkpoints;
pub mod entitlements;
pub mod export;
pub mod identity;
pub mod latch;
pub mod provision;
pub mod revocation;
pub mod rollback_counter;
pub mod server;
pub mod settings;
pub mod stations;
pub mod status;
