//! Reading small files (configs, tokenizers) that a user names: regular files only, of
//! bounded size, so that `--config /dev/zero` or a mistyped multi-GB path fails at once
//! instead of filling memory.

use crate::error::{EngramError, Result};
use std::io::Read;
use std::path::Path;

/// Largest config JSON read.
pub const MAX_CONFIG_BYTES: u64 = 16 << 20;
/// Largest `tokenizer.json` read.
pub const MAX_TOKENIZER_BYTES: u64 = 1 << 30;

/// The bytes of `path`, refusing anything but a regular file of at most `limit` bytes.
pub fn read_limited(path: &Path, limit: u64, what: &str) -> Result<Vec<u8>> {
    let meta = std::fs::metadata(path).map_err(|e| EngramError::io(path, e))?;
    if !meta.is_file() {
        return Err(EngramError::invalid(
            format!("{what} {}", path.display()),
            "a regular file",
            if meta.is_dir() {
                "a directory"
            } else {
                "a device, pipe or socket"
            },
        ));
    }
    if meta.len() > limit {
        return Err(EngramError::invalid(
            format!("{what} {}", path.display()),
            format!("a file of at most {}", crate::budget::human(limit)),
            crate::budget::human(meta.len()),
        ));
    }
    let mut v = Vec::with_capacity(meta.len() as usize);
    std::fs::File::open(path)
        .and_then(|f| f.take(limit + 1).read_to_end(&mut v))
        .map_err(|e| EngramError::io(path, e))?;
    if v.len() as u64 > limit {
        return Err(EngramError::invalid(
            format!("{what} {}", path.display()),
            format!("a file of at most {}", crate::budget::human(limit)),
            "a file that grew while being read",
        ));
    }
    Ok(v)
}

/// [`read_limited`] as UTF-8 text.
pub fn read_limited_string(path: &Path, limit: u64, what: &str) -> Result<String> {
    String::from_utf8(read_limited(path, limit, what)?).map_err(|e| {
        EngramError::invalid(
            format!("{what} {}", path.display()),
            "UTF-8 text",
            format!("invalid UTF-8 at byte {}", e.utf8_error().valid_up_to()),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_directories_and_large_files_are_refused() {
        #[cfg(unix)]
        {
            let e = read_limited(Path::new("/dev/zero"), 10, "config").unwrap_err();
            assert!(e.to_string().contains("device"), "{e}");
        }
        let d = std::env::temp_dir();
        let e = read_limited(&d, 10, "config").unwrap_err();
        assert!(e.to_string().contains("directory"), "{e}");
        let p = d.join(format!("engram-files-{}", std::process::id()));
        std::fs::write(&p, b"0123456789ab").unwrap();
        let e = read_limited(&p, 10, "config").unwrap_err();
        assert!(e.to_string().contains("at most 10 B"), "{e}");
        assert_eq!(read_limited(&p, 12, "config").unwrap(), b"0123456789ab");
        std::fs::write(&p, [0xff, 0xfe]).unwrap();
        assert!(read_limited_string(&p, 12, "config").is_err());
    }
}

/// The first key that occurs twice in one JSON object of `text`, as a path (`dim`,
/// `weight_map.layers.1.engram.q_weight`): `serde_json::Value` keeps the last of them, so a
/// config or index edited by hand would silently lose the first. `None` for JSON without
/// one, and for text that is not JSON (its parser names that error).
pub fn json_duplicate_key(text: &str) -> Option<String> {
    use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
    use std::fmt;

    /// Walks a value; `Err` carries the duplicate's path (or a parse error, mapped to None).
    struct Walk(String);

    impl<'de> DeserializeSeed<'de> for Walk {
        type Value = Option<String>;
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Option<String>, D::Error> {
            d.deserialize_any(self)
        }
    }

    impl<'de> Visitor<'de> for Walk {
        type Value = Option<String>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("any JSON value")
        }
        fn visit_bool<E>(self, _: bool) -> Result<Option<String>, E> {
            Ok(None)
        }
        fn visit_i64<E>(self, _: i64) -> Result<Option<String>, E> {
            Ok(None)
        }
        fn visit_u64<E>(self, _: u64) -> Result<Option<String>, E> {
            Ok(None)
        }
        fn visit_f64<E>(self, _: f64) -> Result<Option<String>, E> {
            Ok(None)
        }
        fn visit_str<E>(self, _: &str) -> Result<Option<String>, E> {
            Ok(None)
        }
        fn visit_unit<E>(self) -> Result<Option<String>, E> {
            Ok(None)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut s: A) -> Result<Option<String>, A::Error> {
            let mut found = None;
            let mut i = 0usize;
            while let Some(f) = s.next_element_seed(Walk(format!("{}[{i}]", self.0)))? {
                found = found.or(f);
                i += 1;
            }
            Ok(found)
        }
        fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Option<String>, A::Error> {
            let mut seen = std::collections::HashSet::new();
            let mut found = None;
            while let Some(k) = m.next_key::<String>()? {
                let path = if self.0.is_empty() {
                    k.clone()
                } else {
                    format!("{}.{k}", self.0)
                };
                let inner = m.next_value_seed(Walk(path.clone()))?;
                if !seen.insert(k) {
                    found = found.or(Some(path));
                }
                found = found.or(inner);
            }
            Ok(found)
        }
    }

    let mut d = serde_json::Deserializer::from_str(text);
    Walk(String::new()).deserialize(&mut d).ok().flatten()
}

#[cfg(test)]
mod json_tests {
    #[test]
    fn duplicate_keys_are_found_with_their_path() {
        let f = super::json_duplicate_key;
        assert_eq!(f(r#"{"a": 1, "b": 2}"#), None);
        assert_eq!(
            f(r#"{"dim": 256, "x": [1], "dim": 512}"#).as_deref(),
            Some("dim")
        );
        assert_eq!(
            f(r#"{"weight_map": {"k": "a", "k": "b"}}"#).as_deref(),
            Some("weight_map.k")
        );
        assert_eq!(
            f(r#"[{"a": 1}, {"b": 1, "b": 2}]"#).as_deref(),
            Some("[1].b")
        );
        assert_eq!(f("not json"), None);
    }
}
