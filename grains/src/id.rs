//! Grain identity: a grain type name plus a key.
//!
//! A grain id is all a caller needs to reach a grain; it never names a silo or an activation. Keys come in the
//! four shapes Orleans users know: string, integer, UUID, and compound (integer + string). Both parts are cheap
//! to clone (`&'static str` or shared `Arc<str>`), since an id travels with every call.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The key of a grain within its type.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum GrainKey {
    /// A string key, e.g. a user name.
    Str(Arc<str>),
    /// An integer key.
    Int(i64),
    /// A UUID key.
    Uuid(Uuid),
    /// A compound key: an integer plus a string extension.
    Compound(i64, Arc<str>),
}

impl fmt::Display for GrainKey {
    /// The text form used in logs and as the storage key: `alice`, `42`, a hyphenated UUID, or `42+ext`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GrainKey::Str(s) => f.write_str(s),
            GrainKey::Int(i) => write!(f, "{i}"),
            GrainKey::Uuid(u) => write!(f, "{u}"),
            GrainKey::Compound(i, s) => write!(f, "{i}+{s}"),
        }
    }
}

impl From<&str> for GrainKey {
    fn from(s: &str) -> Self {
        GrainKey::Str(s.into())
    }
}

impl From<String> for GrainKey {
    fn from(s: String) -> Self {
        GrainKey::Str(s.into())
    }
}

impl From<&String> for GrainKey {
    fn from(s: &String) -> Self {
        GrainKey::Str(s.as_str().into())
    }
}

impl From<i64> for GrainKey {
    fn from(i: i64) -> Self {
        GrainKey::Int(i)
    }
}

impl From<Uuid> for GrainKey {
    fn from(u: Uuid) -> Self {
        GrainKey::Uuid(u)
    }
}

impl From<(i64, &str)> for GrainKey {
    fn from((i, s): (i64, &str)) -> Self {
        GrainKey::Compound(i, s.into())
    }
}

impl From<(i64, String)> for GrainKey {
    fn from((i, s): (i64, String)) -> Self {
        GrainKey::Compound(i, s.into())
    }
}

/// The identity of one virtual grain: its type name and its key.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct GrainId {
    grain_type: Cow<'static, str>,
    key: GrainKey,
}

impl GrainId {
    /// The id of the grain of type `grain_type` with key `key`.
    pub fn new(grain_type: impl Into<Cow<'static, str>>, key: impl Into<GrainKey>) -> Self {
        Self { grain_type: grain_type.into(), key: key.into() }
    }

    /// The grain type name, as registered by `#[grain]`.
    pub fn grain_type(&self) -> &str {
        &self.grain_type
    }

    /// The key within the type.
    pub fn key(&self) -> &GrainKey {
        &self.key
    }
}

impl fmt::Display for GrainId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.grain_type, self.key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_shape_has_a_readable_text_form() {
        let u = Uuid::nil();
        assert_eq!(GrainId::new("Cart", "alice").to_string(), "Cart/alice");
        assert_eq!(GrainId::new("Cart", 42i64).to_string(), "Cart/42");
        assert_eq!(GrainKey::from(u).to_string(), u.to_string());
        assert_eq!(GrainKey::from((7, "eu")).to_string(), "7+eu");
    }

    #[test]
    fn ids_of_different_key_shapes_differ() {
        assert_ne!(GrainId::new("G", 1i64), GrainId::new("G", "1"));
    }
}
