//! Atomic file writes: a new file appears whole or not at all.
//!
//! Every file the crate writes (outputs, states, weights, compression tables) goes through
//! [`write_atomic`]: the bytes go to a temporary file in the destination's folder, which is
//! flushed to disk (`fsync`) and then renamed over the destination. A write that fails or is
//! killed half way leaves the old file as it was. The temporary files in flight are known
//! to [`remove_staged`], which a front end's handler of SIGINT, SIGTERM and SIGHUP calls; a
//! process killed outright (SIGKILL, power loss) leaves a stray `.NAME.engram-tmp-PID-*`
//! file beside the destination, which the next write to that destination removes once its
//! process is gone and the file has not changed for ten minutes.

use crate::error::{EngramError, Result};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// The marker in the names of temporary files (`.NAME.engram-tmp-PID-N-NANOS`).
pub const TMP_MARKER: &str = ".engram-tmp-";

/// The temporary files of this process not yet renamed or removed.
static IN_FLIGHT: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

fn in_flight() -> std::sync::MutexGuard<'static, Vec<PathBuf>> {
    IN_FLIGHT.lock().unwrap_or_else(|p| p.into_inner())
}

/// Removes every temporary file this process has in flight (staged, not yet committed) and
/// returns how many: for a handler of SIGINT, SIGTERM or SIGHUP to call before the process
/// ends, so that an interrupted write leaves neither a half-written destination nor a
/// partial file beside it. A write in flight then fails, naming its destination.
pub fn remove_staged() -> usize {
    let mut live = in_flight();
    let n = live.len();
    for p in live.drain(..) {
        let _ = std::fs::remove_file(p);
    }
    n
}

/// [`remove_staged`] for a process about to end at once (out of memory in its allocator, a
/// signal handler): skips the removal, returning `None`, when the list is locked (by this
/// thread, perhaps, in the allocation that failed). Neither allocates nor frees (the list
/// is left as it is) for paths under 384 bytes: `unlink` is all it calls.
pub fn remove_staged_now() -> Option<usize> {
    let live = match IN_FLIGHT.try_lock() {
        Ok(g) => g,
        Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
        Err(std::sync::TryLockError::WouldBlock) => return None,
    };
    for p in live.iter() {
        let _ = std::fs::remove_file(p);
    }
    Some(live.len())
}

/// Removes the temporary file unless the write was committed (also on panic).
struct TmpGuard {
    path: PathBuf,
    committed: bool,
}

impl TmpGuard {
    fn new(path: PathBuf) -> Self {
        in_flight().push(path.clone());
        TmpGuard {
            path,
            committed: false,
        }
    }

    /// Renames the file over `dest`, out of [`remove_staged`]'s reach first (held under its
    /// lock, so that a handler never removes a file being renamed).
    fn rename_to(&mut self, dest: &Path) -> std::io::Result<()> {
        let mut live = in_flight();
        live.retain(|p| *p != self.path);
        let r = std::fs::rename(&self.path, dest);
        if r.is_ok() {
            self.committed = true;
        } else {
            live.push(self.path.clone());
        }
        r
    }
}

impl Drop for TmpGuard {
    fn drop(&mut self) {
        if !self.committed {
            in_flight().retain(|p| *p != self.path);
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// How long a stray temporary file of a process that is gone must have been left unchanged
/// before a later write to the same destination removes it.
const STRAY_AGE: std::time::Duration = std::time::Duration::from_secs(600);

/// Removes stray temporary files of `dest` (`.NAME.engram-tmp-PID-*` in its folder) whose
/// process no longer exists here and which have not changed for [`STRAY_AGE`]: what a
/// write killed outright left. (Linux only: a process is looked up in `/proc`. The age
/// spares a file another PID namespace is still writing.)
fn remove_strays(dest: &Path) {
    #[cfg(target_os = "linux")]
    {
        let (Some(name), Some(folder)) = (dest.file_name(), dest.parent()) else {
            return;
        };
        let folder = if folder.as_os_str().is_empty() {
            Path::new(".")
        } else {
            folder
        };
        let prefix = format!(".{}{TMP_MARKER}", name.to_string_lossy());
        let Ok(entries) = std::fs::read_dir(folder) else {
            return;
        };
        for e in entries.flatten() {
            let file = e.file_name();
            let Some(rest) = file.to_str().and_then(|f| f.strip_prefix(&prefix)) else {
                continue;
            };
            let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
                continue;
            };
            let gone = pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists();
            let old = e
                .metadata()
                .ok()
                .filter(|m| m.is_file())
                .and_then(|m| m.modified().ok())
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age >= STRAY_AGE);
            if gone && old {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = dest;
}

/// The temporary path for `dest`: a hidden file in the same folder, unique per process and
/// call, so that the final `rename` stays on one file system.
fn tmp_path(dest: &Path) -> Result<PathBuf> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let name = dest.file_name().ok_or_else(|| {
        EngramError::invalid(
            format!("output path {}", dest.display()),
            "a file name",
            "a path without one",
        )
    })?;
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let tmp = format!(
        ".{}{TMP_MARKER}{}-{n}-{nanos}",
        name.to_string_lossy(),
        std::process::id()
    );
    Ok(dest.with_file_name(tmp))
}

/// Refuses a destination that a rename must not replace: a directory, a device such as
/// `/dev/null`, a FIFO or a socket, a symbolic link to one of those (`/dev/stdout`), and any
/// path directly in `/dev` or anywhere in `/proc` or `/sys` (`/dev/shm` is fine). A symbolic link to a regular file (or to nothing) is
/// replaced by the new file and its target left as it was: following it would let whoever
/// planted the link in a shared folder choose which file gets overwritten.
pub fn check_output(dest: &Path) -> Result<()> {
    let refuse = |found: &str| {
        EngramError::invalid(
            format!("output {}", dest.display()),
            "a regular file, a link to one, or a new path",
            found,
        )
    };
    if dest.is_dir() {
        return Err(refuse("a directory"));
    }
    // The temporary file goes into the destination's folder: without one, the error would
    // name that internal file.
    let folder = match dest.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if !folder.is_dir() {
        let found = if folder.exists() {
            "a file, not a folder,"
        } else {
            "no folder"
        };
        return Err(EngramError::invalid(
            format!("output {}", dest.display()),
            "a path in an existing folder",
            format!("{found} {}", folder.display()),
        ));
    }
    match std::fs::symlink_metadata(dest) {
        Ok(m) if m.file_type().is_symlink() => match std::fs::metadata(dest) {
            Ok(t) if !t.is_file() => {
                return Err(refuse("a symbolic link to a device, FIFO or socket"))
            }
            _ => {}
        },
        Ok(m) if !m.is_file() => return Err(refuse("a device, FIFO or socket")),
        // A file that may not be written (no write bit for anyone, or not for this user):
        // renaming over it would replace it all the same, as root or in a folder the user
        // may write into.
        #[cfg(unix)]
        Ok(m) if !writable(dest, &m) => {
            use std::os::unix::fs::PermissionsExt;
            return Err(EngramError::invalid(
                format!("output {}", dest.display()),
                "a file this user may write, or a new path",
                format!(
                    "a read-only file (mode {:04o}); make it writable or choose another path",
                    m.permissions().mode() & 0o7777
                ),
            ));
        }
        _ => {}
    }
    #[cfg(unix)]
    {
        let parent = match dest.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        // Entries of /dev itself are devices or links to them (`/dev/fd` resolves into
        // /proc); folders below it such as /dev/shm (a tmpfs) hold ordinary files.
        if let Ok(dir) = std::fs::canonicalize(parent) {
            if dir == Path::new("/dev") || dir.starts_with("/proc") || dir.starts_with("/sys") {
                return Err(refuse(&format!("a path in {}", dir.display())));
            }
        }
    }
    Ok(())
}

/// Whether the existing file `path` (metadata `m`) may be written: some write bit set, and
/// `access(W_OK)` granting it to this user.
#[cfg(unix)]
fn writable(path: &Path, m: &std::fs::Metadata) -> bool {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::PermissionsExt;
    if m.permissions().mode() & 0o222 == 0 {
        return false;
    }
    match std::ffi::CString::new(path.as_os_str().as_bytes()) {
        // SAFETY: `c` is a NUL-terminated path that outlives the call; access reads it only.
        Ok(c) => unsafe { libc::access(c.as_ptr(), libc::W_OK) == 0 },
        Err(_) => true, // a NUL in the path: the write itself will say so
    }
}

/// Writes `dest` atomically: `body` writes the content into a buffered temporary file in the
/// same folder, which is then synced and renamed over `dest`. Directories, devices, FIFOs
/// and sockets are refused ([`check_output`]); a symbolic link is replaced, not followed; an
/// existing file keeps its permissions.
pub fn write_atomic(
    dest: &Path,
    body: impl FnOnce(&mut BufWriter<File>) -> std::io::Result<()>,
) -> Result<()> {
    stage(dest, body)?.commit()
}

/// A file written and synced beside its destination, not yet in place: [`Staged::commit`]
/// renames it over the destination; dropping it removes it. Staging every output of a
/// command before committing any lets a command that fails while writing leave all its
/// outputs as they were (only a rename failing after another has succeeded, e.g. for lack
/// of permission in the folder, leaves them mixed).
#[must_use = "a staged file is removed unless committed"]
pub struct Staged {
    dest: PathBuf,
    guard: TmpGuard,
}

/// The first half of [`write_atomic`]: `body` writes the temporary file, which is synced;
/// `dest` is not touched until [`Staged::commit`].
pub fn stage(
    dest: &Path,
    body: impl FnOnce(&mut BufWriter<File>) -> std::io::Result<()>,
) -> Result<Staged> {
    check_output(dest)?;
    remove_strays(dest);
    let io = |e| EngramError::io(dest, e);
    // A temporary name left by a killed process (same pid, e.g. PID 1 in a container) is
    // skipped, not fatal: names also carry the clock, so such leftovers do not line up.
    let mut attempts = 0;
    let (tmp, file) = loop {
        let tmp = tmp_path(dest)?;
        match File::options().write(true).create_new(true).open(&tmp) {
            Ok(f) => break (tmp, f),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && attempts < 64 => {
                attempts += 1;
            }
            // Named by the destination, the path the caller knows (the folder refused the
            // temporary file beside it: permissions, a full disk).
            Err(e) => return Err(EngramError::io(dest, e)),
        }
    };
    let guard = TmpGuard::new(tmp.clone());
    if let Ok(meta) = std::fs::metadata(dest) {
        // Keep the mode of the file being replaced (best effort).
        let _ = std::fs::set_permissions(&tmp, meta.permissions());
    }
    let mut w = BufWriter::with_capacity(1 << 20, file);
    body(&mut w).map_err(io)?;
    w.flush().map_err(io)?;
    let file = w.into_inner().map_err(|e| io(e.into_error()))?;
    file.sync_all().map_err(io)?;
    Ok(Staged {
        dest: dest.to_path_buf(),
        guard,
    })
}

impl Staged {
    /// Renames the staged file over its destination and syncs the folder.
    pub fn commit(mut self) -> Result<()> {
        let dest = &self.dest;
        self.guard
            .rename_to(dest)
            .map_err(|e| EngramError::io(dest, e))?;
        // Make the rename itself durable (a no-op where folders cannot be opened).
        #[cfg(unix)]
        if let Some(dir) = dest.parent() {
            let dir = if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            };
            if let Ok(d) = File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!("engram-atomic-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn strays(d: &Path) -> Vec<String> {
        std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(TMP_MARKER))
            .collect()
    }

    #[test]
    fn replaces_whole_or_not_at_all() {
        let d = dir().join("a");
        std::fs::create_dir_all(&d).unwrap();
        let p = d.join("out.bin");
        std::fs::write(&p, b"old").unwrap();
        write_atomic(&p, |w| w.write_all(b"new content")).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"new content");
        // A body that fails half way: the old file stays, no temporary file is left.
        let err = write_atomic(&p, |w| {
            w.write_all(b"partial")?;
            Err(std::io::Error::other("disk on fire"))
        })
        .unwrap_err();
        assert!(err.to_string().contains("disk on fire"), "{err}");
        assert!(err.to_string().contains("out.bin"), "{err}");
        assert_eq!(std::fs::read(&p).unwrap(), b"new content");
        assert!(strays(&d).is_empty(), "{:?}", strays(&d));
        // A panicking body: same.
        let r = std::panic::catch_unwind(|| {
            let _ = write_atomic(&p, |w| {
                w.write_all(b"x")?;
                panic!("boom")
            });
        });
        assert!(r.is_err());
        assert_eq!(std::fs::read(&p).unwrap(), b"new content");
        assert!(strays(&d).is_empty());
    }

    #[test]
    fn refuses_directories_and_keeps_mode() {
        let d = dir().join("b");
        std::fs::create_dir_all(&d).unwrap();
        let err = write_atomic(&d, |w| w.write_all(b"x")).unwrap_err();
        assert!(err.to_string().contains("directory"), "{err}");
        // A path in a folder that does not exist names the path and the folder, not the
        // temporary file that could not be created there.
        let missing = d.join("no-such-folder").join("out.bin");
        let err = write_atomic(&missing, |w| w.write_all(b"x"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&missing.display().to_string())
                && err.contains("existing folder")
                && !err.contains(TMP_MARKER),
            "{err}"
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let p = d.join("mode.bin");
            std::fs::write(&p, b"old").unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o640)).unwrap();
            write_atomic(&p, |w| w.write_all(b"new")).unwrap();
            let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o640);
        }
    }

    /// A link is replaced, its target left alone (also a dangling one); devices and FIFOs
    /// are refused and left as they were.
    #[cfg(target_os = "linux")]
    #[test]
    fn replaces_links_and_refuses_special_files() {
        let d = dir().join("c");
        std::fs::create_dir_all(&d).unwrap();
        let target = d.join("target.bin");
        std::fs::write(&target, b"old").unwrap();
        for (name, to) in [
            ("link.bin", target.clone()),
            ("dangling.bin", d.join("nowhere")),
        ] {
            let link = d.join(name);
            let _ = std::fs::remove_file(&link);
            std::os::unix::fs::symlink(&to, &link).unwrap();
            write_atomic(&link, |w| w.write_all(b"new")).unwrap();
            assert!(std::fs::symlink_metadata(&link).unwrap().is_file());
            assert_eq!(std::fs::read(&link).unwrap(), b"new");
        }
        assert_eq!(std::fs::read(&target).unwrap(), b"old");
        assert!(!d.join("nowhere").exists());

        let fifo = d.join("fifo");
        let _ = std::fs::remove_file(&fifo);
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: `c` is a NUL-terminated path that outlives the call.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = write_atomic(&fifo, |w| w.write_all(b"x")).unwrap_err();
        assert!(e.to_string().contains("FIFO"), "{e}");
        let ft = std::fs::symlink_metadata(&fifo).unwrap().file_type();
        assert!(!ft.is_file(), "the FIFO was replaced");
        let e = write_atomic(Path::new("/dev/null"), |w| w.write_all(b"x")).unwrap_err();
        assert!(e.to_string().contains("/dev/null"), "{e}");
        // /dev/stdout is a link into /proc; a link of ours to a FIFO or a device likewise.
        let e = write_atomic(Path::new("/dev/stdout"), |w| w.write_all(b"x")).unwrap_err();
        assert!(e.to_string().contains("/dev/stdout"), "{e}");
        assert!(check_output(Path::new("/dev/fd/1")).is_err());
        if Path::new("/dev/shm").is_dir() {
            check_output(Path::new("/dev/shm/engram-out.safetensors")).unwrap();
        }
        assert!(std::fs::symlink_metadata("/dev/stdout")
            .unwrap()
            .file_type()
            .is_symlink());
        for (name, to) in [("to-fifo", fifo.clone()), ("to-null", "/dev/null".into())] {
            let link = d.join(name);
            let _ = std::fs::remove_file(&link);
            std::os::unix::fs::symlink(&to, &link).unwrap();
            let e = write_atomic(&link, |w| w.write_all(b"x")).unwrap_err();
            assert!(e.to_string().contains("symbolic link to a device"), "{e}");
            assert!(std::fs::symlink_metadata(&link)
                .unwrap()
                .file_type()
                .is_symlink());
        }
        assert!(strays(&d).is_empty(), "{:?}", strays(&d));

        // Names carry the clock: a leftover of the same pid and counter is not taken again.
        let p = d.join("busy.bin");
        assert_ne!(tmp_path(&p).unwrap(), tmp_path(&p).unwrap());
    }
}
