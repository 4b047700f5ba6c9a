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
