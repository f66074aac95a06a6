//! JSON values read the way `serde_json::Value`'s accessors read them (`as_u64`, `as_str`,
//! `as_object`): a value of another type is no value rather than an error, and nothing is
//! built for what is skipped. For reading an upstream's answer for accounting without making
//! a `Value` tree of it.

use std::fmt;

use serde::de::{Deserialize, Deserializer, IgnoredAny, MapAccess, Visitor};

/// The visitor methods of the JSON types every reader here skips (booleans, signed and
/// floating-point numbers, null, arrays): each is read past and gives `$none`.
macro_rules! others_are_none {
    ($none:expr) => {
        fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
            Ok($none)
        }
        fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
            Ok($none)
        }
        fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
            Ok($none)
        }
        fn visit_unit<E>(self) -> Result<Self::Value, E> {
            Ok($none)
        }
        fn visit_none<E>(self) -> Result<Self::Value, E> {
            Ok($none)
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut seq: A,
        ) -> Result<Self::Value, A::Error> {
            while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
            Ok($none)
        }
    };
}
pub(crate) use others_are_none;

/// Reads past the rest of an object.
pub fn skip_map<'de, A: MapAccess<'de>>(mut map: A) -> Result<(), A::Error> {
    while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
    Ok(())
}

/// A value read as [`serde_json::Value::as_u64`] reads it: an unsigned integer, or `None`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AsU64(pub Option<u64>);

/// A value read as [`serde_json::Value::as_str`] reads it, owned: a string, or `None`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AsString(pub Option<String>);

impl<'de> Deserialize<'de> for AsU64 {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = AsU64;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_u64<E>(self, v: u64) -> Result<AsU64, E> {
                Ok(AsU64(Some(v)))
            }
            fn visit_str<E>(self, _: &str) -> Result<AsU64, E> {
                Ok(AsU64(None))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<AsU64, A::Error> {
                skip_map(map).map(|()| AsU64(None))
            }
            others_are_none!(AsU64(None));
        }
        d.deserialize_any(V)
    }
}

impl<'de> Deserialize<'de> for AsString {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = AsString;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_u64<E>(self, _: u64) -> Result<AsString, E> {
                Ok(AsString(None))
            }
            fn visit_str<E>(self, v: &str) -> Result<AsString, E> {
                Ok(AsString(Some(v.to_string())))
            }
            fn visit_string<E>(self, v: String) -> Result<AsString, E> {
                Ok(AsString(Some(v)))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<AsString, A::Error> {
                skip_map(map).map(|()| AsString(None))
            }
            others_are_none!(AsString(None));
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::{AsString, AsU64};
    use serde_json::Value;

    /// Every kind of JSON value, and one of each that nests.
    const VALUES: &[&str] = &[
        "0",
        "7",
        "18446744073709551615",
        "18446744073709551616",
        "-3",
        "2.5",
        "1e3",
        "true",
        "null",
        r#""12""#,
        r#""a\"b""#,
        "[1, [2], {\"a\": 3}]",
        r#"{"a": {"b": [1, "x"]}, "c": 1}"#,
    ];

    #[test]
    fn each_reads_a_value_as_the_value_accessor_does() {
        for raw in VALUES {
            let v: Value = serde_json::from_str(raw).unwrap();
            let n: AsU64 = serde_json::from_str(raw).unwrap();
            assert_eq!(n.0, v.as_u64(), "{raw}");
            let s: AsString = serde_json::from_str(raw).unwrap();
            assert_eq!(s.0.as_deref(), v.as_str(), "{raw}");
        }
    }
}
