//! The HQ engine. Its modules, each with one job:
//!
//! - [`pki`]: the root CA ceremony — the root, and the cluster certificates it issues;
//! - [`sites`]: the site registry — sites from their identity files, and what HQ keeps
//!   of each (entitlements issued, the checkpoint accepted, clock resets issued);
//! - [`entitlement`]: policies loaded and checked, entitlements issued (`.kfe`, with
//!   their pool keys);
//! - [`revoke`]: revocations of an entitlement (`.kfr`);
//! - [`audit`]: a site's audit bundle imported — verified, staged and reconciled
//!   against the policy (violations);
//! - [`receipts`]: acknowledgments for the site (`.kfk`), and resets of its clock;
//! - [`report`], [`html`]: per site and entitlement, from verified audit data only;
//! - [`devices`]: device certificates revoked, and each batch CA's CRL;
//! - `device_index`: which devices each entitlement released, for reconciliation.
//!
//! Engines never parse bytes by hand nor call primitives directly: files go through
//! `keyfab-formats`, keys through `keyfab-crypto` and `keyfab-custody`.
#![forbid(unsafe_code)]

pub mod audit;
mod device_index;
pub mod devices;
pub mod entitlement;
pub mod html;
pub mod pki;
pub mod receipts;
pub mod report;
pub mod revoke;
pub mod sites;
pub mod status;
