//! The site engine: its identity file ([`identity`]) and entitlement import and listing
//! ([`entitlements`]).
#![forbid(unsafe_code)]

pub mod entitlements;
pub mod identity;
