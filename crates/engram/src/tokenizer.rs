//! Text to token ids, with the DeepSeek-V3 tokenizer bundled in the crate.

use crate::error::{EngramError, Result};
use std::io::Read;
use std::path::{Path, PathBuf};

/// The bundled DeepSeek-V3 `tokenizer.json`, gzip-compressed (MIT, see `assets/README.md`).
static DEEPSEEK_V3_JSON_GZ: &[u8] = include_bytes!("../assets/deepseek-v3-tokenizer.json.gz");
/// The bundled `tokenizer_config.json` of DeepSeek-V3.
static DEEPSEEK_V3_CONFIG: &str = include_str!("../assets/deepseek-v3-tokenizer_config.json");

/// Names under which the bundled tokenizer is used.
pub const BUNDLED_NAMES: [&str; 2] = ["deepseek-v3", "deepseek-ai/DeepSeek-V3"];

/// A Hugging Face tokenizer plus the BOS rule of its `tokenizer_config.json`.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// BOS id prepended by [`Tokenizer::encode`] when `add_bos` is on.
    bos_id: Option<u32>,
    /// Whether `tokenizer_config.json` asks for a BOS token (`add_bos_token`).
    add_bos: bool,
    name: String,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("name", &self.name)
            .field("len", &self.len())
            .field("bos_id", &self.bos_id)
            .field("add_bos", &self.add_bos)
            .finish()
    }
}

fn tok_err(name: &str, message: impl std::fmt::Display) -> EngramError {
    EngramError::Tokenizer {
        source_name: name.to_string(),
        message: message.to_string(),
    }
}

/// Runs `f`, turning a panic into an error with its message, without the panic printed.
/// The `tokenizers` crate panics on some malformed `tokenizer.json` files (found by the
/// `tokenizer_json` fuzz target: an `expect` in its decoder deserialiser), and a file a user
/// names must give an error, not a crash. The panic hook is process-wide, so it is swapped
/// under a lock for the duration of `f` only.
pub(crate) fn quietly<T>(f: impl FnOnce() -> T) -> std::result::Result<T, String> {
    static HOOK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = HOOK.lock().unwrap_or_else(|e| e.into_inner());
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    std::panic::set_hook(previous);
    r.map_err(|p| {
        p.downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "the parser panicked".into())
    })
}

impl Tokenizer {
    /// Loads `deepseek-v3` / `deepseek-ai/DeepSeek-V3` from the bundled copy; anything else is a
    /// path to a `tokenizer.json` or to a folder holding one (and maybe `tokenizer_config.json`).
    pub fn from_name_or_path(name_or_path: &str) -> Result<Self> {
        if BUNDLED_NAMES.contains(&name_or_path) {
            return Self::bundled();
        }
        let path = Path::new(name_or_path);
        let (json_path, config_path): (PathBuf, Option<PathBuf>) = if path.is_dir() {
            let cfg = path.join("tokenizer_config.json");
            (path.join("tokenizer.json"), cfg.exists().then_some(cfg))
        } else {
            let cfg = path.with_file_name("tokenizer_config.json");
            (path.to_path_buf(), cfg.exists().then_some(cfg))
        };
        if !json_path.exists() {
            // An empty name would print as nothing at all.
            let (name, found) = if name_or_path.is_empty() {
                ("\"\"", "found an empty name".to_string())
            } else {
                (
                    name_or_path,
                    format!("{} does not exist", json_path.display()),
                )
            };
            return Err(tok_err(
                name,
                format!("expected `deepseek-v3`, a tokenizer.json or a folder with one; {found}"),
            ));
        }
        let bytes =
            crate::files::read_limited(&json_path, crate::files::MAX_TOKENIZER_BYTES, "tokenizer")?;
        let config = match config_path {
            Some(p) => Some(crate::files::read_limited_string(
                &p,
                crate::files::MAX_CONFIG_BYTES,
                "tokenizer config",
            )?),
            None => None,
        };
        Self::from_bytes(name_or_path, &bytes, config.as_deref())
    }

    /// The bundled DeepSeek-V3 tokenizer.
    pub fn bundled() -> Result<Self> {
        let mut json = Vec::with_capacity(8 << 20);
        flate2::read::GzDecoder::new(DEEPSEEK_V3_JSON_GZ)
            .read_to_end(&mut json)
            .map_err(|e| tok_err("deepseek-v3 (bundled)", e))?;
        Self::from_bytes("deepseek-v3", &json, Some(DEEPSEEK_V3_CONFIG))
    }

    /// Builds from the bytes of a `tokenizer.json` and, optionally, a `tokenizer_config.json`.
    pub fn from_bytes(name: &str, json: &[u8], config_json: Option<&str>) -> Result<Self> {
        let inner = quietly(|| tokenizers::Tokenizer::from_bytes(json))
            .map_err(|panic| tok_err(name, format!("malformed tokenizer.json ({panic})")))?
            .map_err(|e| tok_err(name, e))?;
        let len = inner.get_vocab_size(true);
        if len == 0 {
            return Err(tok_err(
                name,
                "expected a vocabulary of at least one token, found none",
            ));
        }
        // The layer reads ids 0..len(tokenizer) (the compression table has one entry per id),
        // so an id past them would be refused only when a text met it, in words about the
        // inputs: refused here, naming the tokenizer.
        if let Some((token, id)) = inner
            .get_vocab(true)
            .into_iter()
            .filter(|&(_, id)| id as usize >= len)
            .max_by_key(|&(_, id)| id)
        {
            return Err(tok_err(
                name,
                format!(
                    "expected token ids 0..{len} (one per token, as len(tokenizer) counts them), \
                     found id {id} (token {token:?})"
                ),
            ));
        }
        let (mut add_bos, mut bos_id) = (false, None);
        if let Some(cfg) = config_json {
            let v: serde_json::Value = serde_json::from_str(cfg)
                .map_err(|e| tok_err(name, format!("tokenizer_config.json: {e}")))?;
            add_bos = v
                .get("add_bos_token")
                .and_then(|b| b.as_bool())
                .unwrap_or(false);
            let bos = v.get("bos_token").and_then(|b| match b {
                serde_json::Value::String(s) => Some(s.clone()),
                serde_json::Value::Object(o) => {
                    o.get("content").and_then(|c| c.as_str()).map(String::from)
                }
                _ => None,
            });
            if let Some(bos) = bos {
                bos_id = inner.token_to_id(&bos);
            }
            if add_bos && bos_id.is_none() {
                return Err(tok_err(
                    name,
                    "tokenizer_config.json sets add_bos_token but its bos_token is not in the vocabulary",
                ));
            }
        }
        Ok(Tokenizer {
            inner,
            bos_id,
            add_bos,
            name: name.to_string(),
        })
    }

    /// `len(tokenizer)`: the number of ids, added tokens included.
    pub fn len(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Whether the vocabulary is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether [`Tokenizer::encode`] prepends BOS by default (`add_bos_token`).
    pub fn adds_bos(&self) -> bool {
        self.add_bos
    }

    /// The BOS id, if the config names one.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }

    /// The name or path it was loaded from.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `tokenizer(text).input_ids` as transformers 4.x gives it: BOS first when
    /// `add_bos_token` is set and `add_bos` is true.
    pub fn encode(&self, text: &str, add_bos: bool) -> Result<Vec<i64>> {
        // The `tokenizers` crate can panic on a loadable but odd file (e.g. its Strip
        // decoder/normaliser with cuts past a token): an error, not a crash.
        let enc = quietly(|| self.inner.encode(text, false))
            .map_err(|p| tok_err(&self.name, format!("encoding panicked: {p}")))?
            .map_err(|e| tok_err(&self.name, e))?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if add_bos && self.add_bos {
            if let Some(b) = self.bos_id {
                ids.push(b as i64);
            }
        }
        ids.extend(enc.get_ids().iter().map(|&i| i as i64));
        Ok(ids)
    }

    /// Decodes ids with special tokens kept.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, false)
            .map_err(|e| tok_err(&self.name, e))
    }

    /// The vocabulary string of an id (`convert_ids_to_tokens`).
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The wrapped Hugging Face tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WORDLEVEL: &str = r#"{"version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [], "normalizer": null, "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": null, "decoder": DECODER,
        "model": {"type": "WordLevel", "vocab": {"a": 0, "b": 1, "[UNK]": 2}, "unk_token": "[UNK]"}}"#;

    #[test]
    fn malformed_tokenizer_json_is_an_error_not_a_panic() {
        let ok = WORDLEVEL.replace("DECODER", "null");
        let t = Tokenizer::from_bytes("tiny", ok.as_bytes(), None).unwrap();
        assert_eq!(t.encode("a b a", false).unwrap(), vec![0, 1, 0]);
        // `Null` is not JSON; the tokenizers crate panics on it inside its decoder parser
        // (found by the tokenizer_json fuzz target).
        let bad = WORDLEVEL.replace("DECODER", "Null");
        let e = Tokenizer::from_bytes("tiny", bad.as_bytes(), None).unwrap_err();
        assert!(e.to_string().contains("malformed tokenizer.json"), "{e}");
        // The panic hook is restored afterwards.
        assert!(std::panic::catch_unwind(|| panic!("still reported")).is_err());
    }

    #[test]
    fn an_empty_name_is_named_as_one() {
        let e = Tokenizer::from_name_or_path("").unwrap_err().to_string();
        assert!(
            e.contains(r#"tokenizer "": expected"#) && e.contains("found an empty name"),
            "{e}"
        );
    }

    /// An id at or past len(tokenizer) is refused at load, naming the tokenizer and the id
    /// (the compression table covers ids 0..len only).
    #[test]
    fn an_id_past_the_token_count_is_an_error() {
        let sparse = WORDLEVEL
            .replace("DECODER", "null")
            .replace(r#""[UNK]": 2"#, r#""[UNK]": 4000000000"#);
        let e = Tokenizer::from_bytes("sparse", sparse.as_bytes(), None).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("sparse")
                && msg.contains("expected token ids 0..3")
                && msg.contains("found id 4000000000"),
            "{msg}"
        );
    }

    #[test]
    fn an_empty_vocabulary_is_an_error() {
        let empty = WORDLEVEL
            .replace("DECODER", "null")
            .replace(r#"{"a": 0, "b": 1, "[UNK]": 2}"#, "{}");
        let e = Tokenizer::from_bytes("empty", empty.as_bytes(), None).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("empty") && msg.contains("found none"), "{msg}");
    }
}
