//! Grain identity: a grain type name plus a key.
//!
//! A grain id is all a caller needs to reach a grain; it never names a silo or an activation. Keys come in the
//! four shapes Orleans users know: string, integer, UUID, and compound (integer + string). Both parts are cheap
//! to clone (`&'static str` or shared `Arc<str>`), since an id travels with every call.
//!
//! A key has two text forms. [`Display`](fmt::Display) is for people (`alice`, `42`, `42+eu`) and may look
//! alike across shapes: `Int(5)` and `Str("5")` both print `5`. [`GrainKey::storage_key`] is for storage rows
//! (state, reminders): it tags the shape, so two different keys never share a row, and it parses back
//! ([`GrainKey::from_storage_key`]), so an operator or a tool can tell which grain a row belongs to.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use grains_storage::StateKey;
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
    /// The human text form, for logs: `alice`, `42`, a hyphenated UUID, or `42+ext`. Different keys can print
    /// alike (`Int(5)`, `Str("5")`); storage uses [`GrainKey::storage_key`] instead.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GrainKey::Str(s) => f.write_str(s),
            GrainKey::Int(i) => write!(f, "{i}"),
            GrainKey::Uuid(u) => write!(f, "{u}"),
            GrainKey::Compound(i, s) => write!(f, "{i}+{s}"),
        }
    }
}

impl GrainKey {
    /// The key as stored in a row: its shape tag, a colon, then the value.
    ///
    /// | key | storage form |
    /// | --- | --- |
    /// | `Str("alice")` | `s:alice` (the string verbatim, colons and all) |
    /// | `Int(-42)` | `i:-42` (decimal, as `i64` prints it) |
    /// | `Uuid(…)` | `u:67e55044-10b1-426f-9247-bb680e5fe0c8` (hyphenated, lower case) |
    /// | `Compound(42, "eu")` | `c:42:eu` (the integer, a colon, then the extension verbatim) |
    ///
    /// The tag decides the shape, and within a shape the value is written one way only (an integer has no
    /// colon, so the first colon after `c:` ends it), so distinct keys never have the same storage form, and
    /// [`from_storage_key`](Self::from_storage_key) gives the key back.
    pub fn storage_key(&self) -> String {
        match self {
            GrainKey::Str(s) => format!("s:{s}"),
            GrainKey::Int(i) => format!("i:{i}"),
            GrainKey::Uuid(u) => format!("u:{u}"),
            GrainKey::Compound(i, s) => format!("c:{i}:{s}"),
        }
    }

    /// The key whose [`storage_key`](Self::storage_key) is `text`; `None` when `text` is not one (no known tag,
    /// or a value not in its one canonical spelling, such as `i:05` or an upper-case UUID).
    pub fn from_storage_key(text: &str) -> Option<GrainKey> {
        let (tag, value) = text.split_once(':')?;
        match tag {
            "s" => Some(GrainKey::Str(value.into())),
            "i" => canonical_int(value).map(GrainKey::Int),
            "u" => Uuid::try_parse(value).ok().filter(|u| u.to_string() == value).map(GrainKey::Uuid),
            "c" => {
                let (int, ext) = value.split_once(':')?;
                canonical_int(int).map(|i| GrainKey::Compound(i, ext.into()))
            }
            _ => None,
        }
    }
}

/// `text` as an `i64` if it is spelled exactly as the integer prints (no `+`, no leading zeros).
fn canonical_int(text: &str) -> Option<i64> {
    text.parse::<i64>().ok().filter(|i| i.to_string() == text)
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
#[derive(Debug, Clone, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct GrainId {
    grain_type: Cow<'static, str>,
    key: GrainKey,
}

impl PartialEq for GrainId {
    /// The key first (an integer compare, for most grains), then the type name: one pointer compare when both
    /// name the same string, as the ids of every typed reference to one grain type do (they name
    /// `G::TYPE_NAME`). Every warm call compares two ids, in the silo's activation table.
    fn eq(&self, other: &Self) -> bool {
        let same_name = |a: &str, b: &str| (a.as_ptr() == b.as_ptr() && a.len() == b.len()) || a == b;
        self.key == other.key && same_name(&self.grain_type, &other.grain_type)
    }
}

impl std::hash::Hash for GrainId {
    /// As a derived `Hash` would: the type name, then the key (consistent with `eq`, which compares the same).
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.grain_type.hash(state);
        self.key.hash(state);
    }
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

    /// Where this grain's persistent state called `state_name` is stored: the grain type, the key's
    /// [`storage_key`](GrainKey::storage_key) form, and the state name.
    pub fn state_key(&self, state_name: &str) -> StateKey {
        StateKey::new(self.grain_type(), self.key.storage_key(), state_name)
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
    fn ids_are_equal_by_name_and_key_wherever_their_name_is_stored() {
        use std::hash::BuildHasher;
        let fixed = std::hash::BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default();
        let named = GrainId::new("Cart", 7);
        let owned = GrainId::new(String::from("Cart"), 7);
        assert_eq!(named, owned, "a static name and an owned copy of it");
        assert_eq!(fixed.hash_one(&named), fixed.hash_one(&owned));
        assert_ne!(named, GrainId::new("Cart", 8));
        assert_ne!(named, GrainId::new("Car", 7));
        assert_ne!(GrainId::new(&"Carts"[..4], 7), GrainId::new("Carts", 7), "same start, not the same name");
        assert_eq!(GrainId::new(&"Carts"[..4], 7), named);
    }

    #[test]
    fn every_key_shape_has_a_readable_text_form() {
        let u = Uuid::nil();
        assert_eq!(GrainId::new("Cart", "alice").to_string(), "Cart/alice");
        assert_eq!(GrainId::new("Cart", 42i64).to_string(), "Cart/42");
        assert_eq!(GrainKey::from(u).to_string(), u.to_string());
        assert_eq!(GrainKey::from((7, "eu")).to_string(), "7+eu");
    }

    /// Keys of every shape built from strings that look like tags, separators, numbers and each other.
    fn tricky_keys() -> Vec<GrainKey> {
        let strings = [
            "",
            ":",
            "::",
            "s:",
            "i:5",
            "u:",
            "c:1:x",
            "5",
            "-5",
            "05",
            "+5",
            "1+x",
            "1:x",
            "x:1",
            "a:b:c",
            " 5",
            "\0",
            "\n",
            "é🦀",
            "00000000-0000-0000-0000-000000000005",
        ];
        let ints = [0, 5, -5, 1, 12, i64::MIN, i64::MAX];
        let mut keys = Vec::new();
        for s in strings {
            keys.push(GrainKey::from(s));
            for i in ints {
                keys.push(GrainKey::from((i, s)));
            }
        }
        keys.extend(ints.map(GrainKey::Int));
        keys.extend([Uuid::nil(), Uuid::from_u128(5), Uuid::max()].map(GrainKey::Uuid));
        keys
    }

    #[test]
    fn storage_keys_are_tagged_by_shape() {
        let u = Uuid::from_u128(0x5);
        assert_eq!(GrainKey::from("alice").storage_key(), "s:alice");
        assert_eq!(GrainKey::Int(-42).storage_key(), "i:-42");
        assert_eq!(GrainKey::Uuid(u).storage_key(), format!("u:{u}"));
        assert_eq!(GrainKey::from((42, "eu:west")).storage_key(), "c:42:eu:west");
    }

    #[test]
    fn distinct_keys_never_share_a_storage_key_and_every_storage_key_parses_back() {
        let keys = tricky_keys();
        let mut seen = std::collections::HashMap::new();
        for key in &keys {
            let stored = key.storage_key();
            if let Some(other) = seen.insert(stored.clone(), key.clone()) {
                assert_eq!(&other, key, "{other:?} and {key:?} share the storage key {stored:?}");
            }
            assert_eq!(GrainKey::from_storage_key(&stored).as_ref(), Some(key), "{stored:?} parses back");
        }
        assert!(seen.len() > 150, "the cases cover many distinct keys: {}", seen.len());
    }

    #[test]
    fn text_that_no_key_stores_as_does_not_parse() {
        let upper = format!("u:{}", Uuid::from_u128(0xabc).to_string().to_uppercase());
        let simple = format!("u:{}", Uuid::from_u128(0xabc).simple());
        for text in ["", "5", "alice", "x:1", "S:a", "i:", "i:05", "i:+5", "i:-0", "i: 5", "i:5x", "c:1", "c::x"] {
            assert_eq!(GrainKey::from_storage_key(text), None, "{text:?}");
        }
        for text in [upper.as_str(), simple.as_str(), "c:01:x", "c:a:b", "i:99999999999999999999"] {
            assert_eq!(GrainKey::from_storage_key(text), None, "{text:?}");
        }
    }

    #[test]
    fn a_state_key_holds_the_storage_form_of_the_grain_key() {
        let key = GrainId::new("Cart", 5i64).state_key("state");
        assert_eq!(key, StateKey::new("Cart", "i:5", "state"));
        assert_ne!(key, GrainId::new("Cart", "5").state_key("state"));
    }

    #[test]
    fn ids_of_different_key_shapes_differ() {
        assert_ne!(GrainId::new("G", 1i64), GrainId::new("G", "1"));
    }
}
