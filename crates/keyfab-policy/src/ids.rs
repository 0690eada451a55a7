//! The ids and names that come from outside — a station's request, an operator's
//! argument, a file — checked once, where they enter, and carried as types from there:
//! a function that takes a [`DeviceId`] never sees an id nobody checked, and an
//! entitlement id cannot be passed where a device id is meant.
//!
//! Two shapes: an *id* (entitlement, device, request) is 1 to [`MAX_ID_BYTES`] printable
//! ASCII characters without spaces, so nothing larger or stranger reaches the audit log;
//! a *name* (site, station) is 1 to 64 of `a-z 0-9 . _ -`, starting with a letter or
//! digit, because it also becomes a certificate's common name and a file name.

use std::fmt;

/// Longest id a request may carry (device id, request id, entitlement id), in bytes:
/// every id a station sends ends up in an audit record, and a record must stay far below
/// what an export carries (docs/FORMATS.md §9).
pub const MAX_ID_BYTES: usize = 128;

/// Longest site or station name, in bytes.
pub const MAX_NAME_BYTES: usize = 64;

/// Whether `id` has the shape every id from outside must have: 1 to [`MAX_ID_BYTES`]
/// printable ASCII characters, no space. A policy's `id_pattern` narrows it further.
pub fn id_shape_ok(id: &str) -> bool {
    !id.is_empty() && id.len() <= MAX_ID_BYTES && id.bytes().all(|b| b.is_ascii_graphic())
}

/// Whether `name` is a site or station name: 1 to [`MAX_NAME_BYTES`] of `a-z 0-9 . _ -`,
/// starting with a letter or digit.
pub fn name_shape_ok(name: &str) -> bool {
    name.len() <= MAX_NAME_BYTES
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && name.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
        })
}

/// An id or name that does not have its shape. The message names what it is and says
/// what is wrong; an id itself is never repeated (it may be anything a station sent),
/// a name is (it is short and printable when it is refused for its characters only).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct IdError(String);

fn id_error(what: &str, id: &str) -> IdError {
    IdError(format!(
        "{what} must be 1-{MAX_ID_BYTES} printable ASCII characters without spaces (this one has {} bytes{})",
        id.len(),
        if id.bytes().all(|b| b.is_ascii_graphic()) {
            ""
        } else {
            ", some not printable"
        }
    ))
}

fn name_error(what: &str, name: &str) -> IdError {
    let shown = if name.len() <= MAX_NAME_BYTES && name.bytes().all(|b| b.is_ascii_graphic()) {
        format!("'{name}'")
    } else {
        format!("of {} bytes", name.len())
    };
    IdError(format!(
        "{what} {shown} must be 1-{MAX_NAME_BYTES} characters of a-z 0-9 . _ - starting with a letter or digit"
    ))
}

macro_rules! checked_text {
    ($(#[$doc:meta])* $name:ident, $what:literal, $ok:path, $error:path) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(String);

        impl $name {
            /// What it is, as messages name it.
            pub const WHAT: &'static str = $what;

            /// The text.
            pub fn as_str(&self) -> &str {
                &self.0
            }

            /// The text, owned.
            pub fn into_string(self) -> String {
                self.0
            }
        }

        impl TryFrom<&str> for $name {
            type Error = IdError;
            fn try_from(text: &str) -> Result<Self, IdError> {
                if $ok(text) {
                    Ok(Self(text.to_owned()))
                } else {
                    Err($error($what, text))
                }
            }
        }

        impl TryFrom<String> for $name {
            type Error = IdError;
            fn try_from(text: String) -> Result<Self, IdError> {
                if $ok(&text) {
                    Ok(Self(text))
                } else {
                    Err($error($what, &text))
                }
            }
        }

        impl std::str::FromStr for $name {
            type Err = IdError;
            fn from_str(text: &str) -> Result<Self, IdError> {
                Self::try_from(text)
            }
        }

        impl std::ops::Deref for $name {
            type Target = str;
            fn deref(&self) -> &str {
                &self.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.0 == other
            }
        }

        impl PartialEq<String> for $name {
            fn eq(&self, other: &String) -> bool {
                self.0 == *other
            }
        }

        impl PartialEq<$name> for String {
            fn eq(&self, other: &$name) -> bool {
                *self == other.0
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.0 == *other
            }
        }
    };
}

checked_text!(
    /// An entitlement's id, as HQ made it and stations send it.
    EntitlementId,
    "the entitlement id",
    id_shape_ok,
    id_error
);
checked_text!(
    /// A device's id, as its station sends it.
    DeviceId,
    "the device id",
    id_shape_ok,
    id_error
);
checked_text!(
    /// A request's id: the same id on a retry gets the same answer.
    RequestId,
    "the request id",
    id_shape_ok,
    id_error
);
checked_text!(
    /// A station's name (its certificate's common name).
    StationName,
    "station name",
    name_shape_ok,
    name_error
);
checked_text!(
    /// A site's name (its cluster certificate's common name).
    SiteName,
    "site name",
    name_shape_ok,
    name_error
);

impl RequestId {
    /// The id a confirmation carries through the engine, which takes confirmations on
    /// the same ordered path as requests: empty, which no request from outside can have
    /// (`TryFrom` refuses it), so it never meets a request's record.
    pub fn confirmation() -> Self {
        Self(String::new())
    }

    /// Whether this is [`RequestId::confirmation`].
    pub fn is_confirmation(&self) -> bool {
        self.0.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_checked_once_and_say_why_without_repeating_the_id() {
        assert_eq!(DeviceId::try_from("SN-0001").unwrap().as_str(), "SN-0001");
        let max = "D".repeat(MAX_ID_BYTES);
        assert!(DeviceId::try_from(max.as_str()).is_ok());
        for bad in ["", "a b", "tab\there", "é", &"D".repeat(MAX_ID_BYTES + 1)] {
            let e = DeviceId::try_from(bad).unwrap_err().to_string();
            assert!(e.starts_with("the device id must be"), "{e}");
            assert!(bad.is_empty() || !e.contains(bad), "{e}");
        }
        let e = RequestId::try_from("x\u{7}y").unwrap_err().to_string();
        assert!(e.contains("some not printable"), "{e}");
        assert_eq!(EntitlementId::try_from(String::from("e1")).unwrap(), "e1");
    }

    #[test]
    fn names_are_lowercase_words_that_fit_a_certificate() {
        for good in ["line-1", "shenzhen-1", "a", "0.b_c-d", &"n".repeat(64)] {
            assert!(StationName::try_from(good).is_ok(), "{good}");
        }
        for bad in ["", "Line-1", "-a", ".a", "a b", "a/b", &"n".repeat(65)] {
            let e = SiteName::try_from(bad).unwrap_err().to_string();
            assert!(e.starts_with("site name"), "{e}");
        }
    }
}
