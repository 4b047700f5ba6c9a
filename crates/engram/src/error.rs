//! The one error type of the library.
//!
//! Every variant names the thing that was wrong (a config field, a tensor, a file, a position),
//! what was expected and what was found, so that a caller can print it as it is.

use std::path::PathBuf;

/// Errors of the `engram` library. New variants may be added (`non_exhaustive`): a match
/// outside the crate keeps a catch-all arm.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngramError {
    /// A configuration field holds an invalid value.
    #[error("config field `{field}`: expected {expected}, found {found}")]
    Config {
        /// The JSON name of the field.
        field: String,
        /// What a valid value looks like.
        expected: String,
        /// What was given.
        found: String,
    },
    /// A config file could not be parsed as JSON.
    #[error("config {path}: expected a JSON object, found invalid JSON ({source})")]
    ConfigJson {
        /// The file.
        path: String,
        /// The parser's message.
        #[source]
        source: serde_json::Error,
    },
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A safetensors file is malformed.
    #[error("{path}: not a valid safetensors file: {message}")]
    SafeTensors {
        /// The file.
        path: String,
        /// What the parser found.
        message: String,
    },
    /// The tokenizer could not be loaded or failed.
    #[error("tokenizer {source_name}: {message}")]
    Tokenizer {
        /// Where the tokenizer came from.
        source_name: String,
        /// What went wrong.
        message: String,
    },
    /// A token id is outside the tokenizer's vocabulary.
    #[error(
        "input_ids[{batch}, {position}] = {id} is out of range: the tokenizer has {vocab} ids (0..{vocab})"
    )]
    IdOutOfRange {
        /// Batch row.
        batch: usize,
        /// Position in the sequence.
        position: usize,
        /// The id found.
        id: i64,
        /// The vocabulary size.
        vocab: usize,
    },
    /// A required tensor is missing.
    #[error("tensor `{name}` is missing{context}")]
    MissingTensor {
        /// State-dict or input name.
        name: String,
        /// Where it was looked for (e.g. " from weights.safetensors").
        context: String,
    },
    /// A tensor is present that the model does not use.
    #[error("unexpected tensor `{name}`{context}: the Engram layer has no such parameter")]
    UnexpectedTensor {
        /// The name found.
        name: String,
        /// Where.
        context: String,
    },
    /// A tensor has the wrong shape.
    #[error("tensor `{name}`: expected shape {expected:?}, found {found:?}")]
    Shape {
        /// Tensor name.
        name: String,
        /// Expected shape.
        expected: Vec<usize>,
        /// Found shape.
        found: Vec<usize>,
    },
    /// A tensor has a dtype that cannot be used.
    #[error("tensor `{name}`: expected dtype {expected}, found {found}")]
    DType {
        /// Tensor name.
        name: String,
        /// Accepted dtypes.
        expected: String,
        /// Found dtype.
        found: String,
    },
    /// A tensor holds NaN or infinity where finite values are required.
    #[error("tensor `{name}` holds a non-finite value ({value}) at flat index {index}")]
    NonFinite {
        /// Tensor name.
        name: String,
        /// Flat index of the first bad element.
        index: usize,
        /// The value.
        value: f32,
    },
    /// A run would need more memory or disk space than this machine has.
    #[error(
        "not enough {resource}: this needs {} ({needed} bytes), {} ({available} bytes) \
         available; {detail}",
        human(*needed),
        human(*available)
    )]
    Resource {
        /// `memory`, or `disk space in DIR`.
        resource: String,
        /// Bytes needed.
        needed: u64,
        /// Bytes available.
        available: u64,
        /// What needs it.
        detail: String,
    },
    /// A remote row store failed (after its retries) or holds something else.
    #[error("row store {store}: {message}")]
    Store {
        /// The store (its URL, or the node that failed).
        store: String,
        /// What went wrong.
        message: String,
    },
    /// A tensor error ([`EngramError::Shape`], [`EngramError::DType`],
    /// [`EngramError::NonFinite`]) found in a file, which it names.
    #[error("{path}: {source}")]
    InFile {
        /// The file.
        path: String,
        /// The tensor's error.
        source: Box<EngramError>,
    },
    /// An argument of an API call is invalid.
    #[error("{name}: expected {expected}, found {found}")]
    Invalid {
        /// What argument.
        name: String,
        /// What was expected.
        expected: String,
        /// What was found.
        found: String,
    },
}

/// Result alias of the library.
pub type Result<T, E = EngramError> = std::result::Result<T, E>;

impl EngramError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        EngramError::Io {
            path: path.into(),
            source,
        }
    }

    /// An [`EngramError::Invalid`]: `name` was expected to be `expected`, found `found`.
    pub fn invalid(
        name: impl Into<String>,
        expected: impl Into<String>,
        found: impl std::fmt::Display,
    ) -> Self {
        EngramError::Invalid {
            name: name.into(),
            expected: expected.into(),
            found: clipped(found.to_string()),
        }
    }

    pub(crate) fn config(
        field: impl Into<String>,
        expected: impl Into<String>,
        found: impl std::fmt::Debug,
    ) -> Self {
        EngramError::Config {
            field: field.into(),
            expected: expected.into(),
            found: clipped(format!("{found:?}")),
        }
    }
}

/// A found value as an error shows it: whole up to 300 characters, else its start and its
/// length (a config with a million-entry list must not make a 6 MB error line).
fn clipped(s: String) -> String {
    const MAX: usize = 300;
    if s.len() <= MAX {
        return s;
    }
    let cut = (0..=200)
        .rev()
        .find(|&i| s.is_char_boundary(i))
        .unwrap_or(0);
    format!("{} ... ({} characters)", &s[..cut], s.chars().count())
}

/// `[a, b, c]` for short lists, `[a, b, c, ... z] (N values)` for long ones.
pub(crate) fn short_list<T: std::fmt::Debug>(v: &[T]) -> String {
    if v.len() <= 16 {
        return format!("{v:?}");
    }
    let head: Vec<String> = v[..8].iter().map(|x| format!("{x:?}")).collect();
    format!(
        "[{}, ... {:?}] ({} values)",
        head.join(", "),
        v[v.len() - 1],
        v.len()
    )
}

/// The packed-batch `offsets` of `nseq` sequences over `total` rows: `nseq + 1`
/// non-decreasing entries from 0 to `total` (both layers' batched calls).
pub(crate) fn check_offsets(offsets: &[usize], nseq: usize, total: usize) -> Result<()> {
    if offsets.len() != nseq.saturating_add(1)
        || offsets.first() != Some(&0)
        || offsets.last() != Some(&total)
        || offsets.windows(2).any(|w| w[0] > w[1])
    {
        return Err(EngramError::invalid(
            "offsets",
            format!(
                "{} non-decreasing offsets from 0 to {total} (one more than the {nseq} states)",
                nseq.saturating_add(1)
            ),
            short_list(offsets),
        ));
    }
    Ok(())
}

/// `n` bytes as a short human-readable size.
pub fn human(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut x = n as f64;
    let mut u = 0;
    while x >= 1024.0 && u + 1 < UNITS.len() {
        x /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{x:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_found_values_are_clipped_on_a_char_boundary() {
        let v: Vec<u64> = (0..100_000).collect();
        let e = EngramError::config("engram_vocab_size", "at most 2^20 entries", &v).to_string();
        assert!(e.len() < 400 && e.contains("characters)"), "{}", e.len());
        let wide = "é".repeat(1000);
        let e = EngramError::invalid("x", "short", &wide).to_string();
        assert!(e.contains("(1000 characters)"), "{e}");
        assert_eq!(
            EngramError::invalid("x", "y", 5).to_string(),
            "x: expected y, found 5"
        );
    }
}
