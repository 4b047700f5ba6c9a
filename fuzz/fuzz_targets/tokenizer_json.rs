//! Any bytes as a tokenizer.json (before the first NUL) and a text (after it): loading,
//! encoding and building the compression table fail with errors, never a crash.
#![no_main]

use engram::{CompressedTokenizer, Tokenizer};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let split = data.iter().position(|&b| b == 0).unwrap_or(data.len());
    let (json, text) = (&data[..split], data.get(split + 1..).unwrap_or(&[]));
    let config = std::str::from_utf8(text)
        .ok()
        .filter(|t| t.starts_with('{'));
    let Ok(tok) = Tokenizer::from_bytes("fuzz", json, config) else {
        return;
    };
    let text = String::from_utf8_lossy(text);
    if let Ok(ids) = tok.encode(&text, true) {
        assert!(ids.iter().all(|&i| i >= 0));
    }
    if tok.len() < 4096 {
        if let Ok(c) = CompressedTokenizer::build(&tok) {
            assert!(c.num_compressed() <= c.num_raw());
        }
    }
});
