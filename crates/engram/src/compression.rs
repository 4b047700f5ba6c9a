//! Tokenizer compression: the surjective map raw id -> canonical id (reference §1).
//!
//! Ids whose decoded text is equal after NFKC, NFD, accent stripping, lower-casing and
//! whitespace folding share one canonical id; canonical ids are handed out in order of first
//! appearance. For DeepSeek-V3 this maps 128815 raw ids to 98627 canonical ids.

use crate::error::{EngramError, Result};
use crate::tokenizer::Tokenizer;
use rayon::prelude::*;
use std::collections::HashMap;
use tokenizers::normalizers::{
    strip::{Strip, StripAccents},
    unicode::{NFD, NFKC},
    utils::Lowercase,
    Replace, Sequence,
};
use tokenizers::{NormalizedString, Normalizer, NormalizerWrapper};

/// Private-use character that stands for a lone space while `Strip` runs.
const SENTINEL: &str = "\u{E000}";

/// The reference's key normaliser: NFKC, NFD, StripAccents, Lowercase, `[ \t\r\n]+` -> " ",
/// a lone space kept (through a sentinel), then Strip.
fn key_normalizer() -> Sequence {
    let rep = |pat: &str, content: &str, regex: bool| -> NormalizerWrapper {
        let r = if regex {
            Replace::new(
                tokenizers::normalizers::replace::ReplacePattern::Regex(pat.into()),
                content,
            )
        } else {
            Replace::new(pat, content)
        };
        r.expect("static pattern compiles").into()
    };
    Sequence::new(vec![
        NFKC.into(),
        NFD.into(),
        StripAccents.into(),
        Lowercase.into(),
        rep(r"[ \t\r\n]+", " ", true),
        rep(r"^ $", SENTINEL, true),
        Strip::new(true, true).into(),
        rep(SENTINEL, " ", false),
    ])
}

/// The key under which a raw id is merged (reference §1, steps 1-3).
fn token_key(tok: &Tokenizer, norm: &Sequence, id: u32) -> Result<String> {
    let text = tok.decode(&[id])?;
    if text.contains('\u{FFFD}') {
        return Ok(tok.id_to_token(id).unwrap_or_default());
    }
    let mut n = NormalizedString::from(text.as_str());
    norm.normalize(&mut n).map_err(|e| EngramError::Tokenizer {
        source_name: tok.name().to_string(),
        message: format!("normalising id {id}: {e}"),
    })?;
    let key = n.get();
    Ok(if key.is_empty() {
        text
    } else {
        key.to_string()
    })
}

/// The map raw id -> canonical id of a tokenizer (`CompressedTokenizer` in the reference).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompressedTokenizer {
    lookup: Vec<i64>,
    num_compressed: usize,
}

impl CompressedTokenizer {
    /// Builds the table from a tokenizer: keys are computed in parallel, ids are then handed
    /// out serially in raw-id order.
    pub fn build(tok: &Tokenizer) -> Result<Self> {
        let norm = key_normalizer();
        let v = tok.len() as u32;
        // Decoding runs the file's own decoders, which can panic on a loadable but odd file
        // (the `tokenizers` crate's Strip with cuts past a token): an error, not a crash.
        let keys: Vec<String> = crate::tokenizer::quietly(|| {
            (0..v)
                .into_par_iter()
                .map(|id| token_key(tok, &norm, id))
                .collect::<Result<_>>()
        })
        .map_err(|p| EngramError::Tokenizer {
            source_name: tok.name().to_string(),
            message: format!("decoding the vocabulary panicked: {p}"),
        })??;
        let mut first: HashMap<&str, i64> = HashMap::with_capacity(keys.len());
        let lookup = keys
            .iter()
            .map(|k| {
                let next = first.len() as i64;
                *first.entry(k.as_str()).or_insert(next)
            })
            .collect();
        Ok(CompressedTokenizer {
            lookup,
            num_compressed: first.len(),
        })
    }

    /// Wraps an existing table (e.g. one read from disk); it must be a first-appearance map.
    pub fn from_lookup(lookup: Vec<i64>) -> Result<Self> {
        let mut next = 0i64;
        for (raw, &c) in lookup.iter().enumerate() {
            if c < 0 || c > next {
                return Err(EngramError::invalid(
                    format!("lookup[{raw}]"),
                    format!("a canonical id in 0..={next} (ids are handed out in order)"),
                    c,
                ));
            }
            if c == next {
                next += 1;
            }
        }
        Ok(CompressedTokenizer {
            lookup,
            num_compressed: next as usize,
        })
    }

    /// The table, indexed by raw id.
    pub fn lookup(&self) -> &[i64] {
        &self.lookup
    }

    /// V: number of raw ids.
    pub fn num_raw(&self) -> usize {
        self.lookup.len()
    }

    /// V': number of canonical ids.
    pub fn num_compressed(&self) -> usize {
        self.num_compressed
    }

    /// A short fingerprint of the table (V' and the first 8 bytes of the SHA-256 of the
    /// lookup as little-endian int64): saved states carry it, so that ids compressed by
    /// another tokenizer are refused on restore.
    pub fn fingerprint(&self) -> String {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        for id in &self.lookup {
            h.update(id.to_le_bytes());
        }
        let d = h.finalize();
        let mut first = [0u8; 8];
        first.copy_from_slice(&d[..8]);
        format!(
            "{} canonical ids, sha256 {:016x}",
            self.num_compressed,
            u64::from_be_bytes(first)
        )
    }

    /// Canonical id of one raw id; negative ids pass through (as the reference does).
    #[inline]
    pub fn compress_id(&self, id: i64) -> Option<i64> {
        if id < 0 {
            Some(id)
        } else {
            self.lookup.get(id as usize).copied()
        }
    }

    /// Canonical id of a config's pad id (`field` names it: `pad_id`, `engram_pad_id`); an
    /// id at or past the tokenizer size is a config error naming the field.
    pub fn canonical_pad(&self, field: &str, pad_id: i64) -> Result<i64> {
        self.compress_id(pad_id).ok_or_else(|| {
            EngramError::config(
                field,
                format!("a token id below the tokenizer size {}", self.num_raw()),
                pad_id,
            )
        })
    }

    /// Compresses a `[batch, len]` row-major id array; an id >= V is an error naming it.
    pub fn compress(&self, ids: &[i64], len: usize) -> Result<Vec<i64>> {
        ids.iter()
            .enumerate()
            .map(|(i, &id)| {
                self.compress_id(id).ok_or(EngramError::IdOutOfRange {
                    batch: i / len.max(1),
                    position: i % len.max(1),
                    id,
                    vocab: self.num_raw(),
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file that loads but whose Strip decoder cuts past a token: the `tokenizers` crate
    /// panics while decoding (slice start past its end); building the table gives an error
    /// naming the file instead.
    #[test]
    fn a_decoder_that_panics_is_an_error() {
        let odd = r#"{"version": "1.0", "truncation": null, "padding": null,
            "added_tokens": [], "normalizer": null, "pre_tokenizer": {"type": "Whitespace"},
            "post_processor": null,
            "decoder": {"type": "Strip", "content": "a", "start": 1, "stop": 1},
            "model": {"type": "WordLevel", "vocab": {"a": 0, "b": 1, "[UNK]": 2},
                      "unk_token": "[UNK]"}}"#;
        let t = Tokenizer::from_bytes("odd", odd.as_bytes(), None).unwrap();
        let e = CompressedTokenizer::build(&t)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("odd") && e.contains("panicked"), "{e}");
    }
}
