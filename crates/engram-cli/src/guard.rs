//! What every command checks before it does any work: that no output would overwrite an
//! input or another output, that outputs can be created, and a sane thread count.

use anyhow::{bail, Result};
use std::path::{Path, PathBuf};

/// How a path is identified: by device and inode when it exists (so links and different
/// spellings of one file compare equal), else by its canonical folder and name.
#[derive(PartialEq, Eq, Debug)]
enum FileId {
    Inode(u64, u64),
    Path(PathBuf),
}

fn file_id(p: &Path) -> FileId {
    if let Ok(m) = std::fs::metadata(p) {
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt;
            return FileId::Inode(m.dev(), m.ino());
        }
        #[cfg(not(unix))]
        {
            let _ = m;
            if let Ok(c) = p.canonicalize() {
                return FileId::Path(c);
            }
        }
    }
    let parent = match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    match (parent.canonicalize(), p.file_name()) {
        (Ok(d), Some(n)) => FileId::Path(d.join(n)),
        _ => FileId::Path(p.to_path_buf()),
    }
}

/// The files of one command: (flag, path) of every input and output.
#[derive(Default)]
pub struct Files {
    inputs: Vec<(String, PathBuf)>,
    outputs: Vec<(String, PathBuf)>,
}

impl Files {
    pub fn new() -> Self {
        Self::default()
    }

    /// An input file (skipped when `None`).
    pub fn input(mut self, flag: &str, p: Option<&Path>) -> Self {
        if let Some(p) = p {
            self.inputs.push((flag.to_string(), p.to_path_buf()));
        }
        self
    }

    /// A checkpoint: a file, or every file of a checkpoint folder (its index and shards).
    pub fn checkpoint(mut self, flag: &str, p: &Path) -> Self {
        match std::fs::read_dir(p) {
            Ok(entries) => {
                for e in entries.flatten() {
                    self.inputs.push((flag.to_string(), e.path()));
                }
            }
            Err(_) => self.inputs.push((flag.to_string(), p.to_path_buf())),
        }
        self
    }

    /// The config file (when given) and the tokenizer files its `tokenizer_name_or_path`
    /// names, as inputs.
    pub fn config(mut self, path: Option<&Path>, tokenizer_name_or_path: &str) -> Self {
        self = self.input("--config", path);
        for t in tokenizer_files(tokenizer_name_or_path) {
            self.inputs.push(("tokenizer".to_string(), t));
        }
        self
    }

    /// The files of a `--tokenizer` (a tokenizer.json, or a folder holding one; skipped
    /// when `None`).
    pub fn tokenizer(mut self, p: Option<&Path>) -> Self {
        if let Some(p) = p {
            for t in tokenizer_files(&p.to_string_lossy()) {
                self.inputs.push(("--tokenizer".to_string(), t));
            }
        }
        self
    }

    /// An output file (skipped when `None`).
    pub fn output(mut self, flag: &str, p: Option<&Path>) -> Self {
        if let Some(p) = p {
            self.outputs.push((flag.to_string(), p.to_path_buf()));
        }
        self
    }

    /// Refuses an output that is (the same file as) an input or another output, an output
    /// that names a directory, a device, a FIFO or a socket, and one whose folder does not
    /// exist or cannot be written into (a probe file is created there and removed).
    pub fn check(&self) -> Result<()> {
        for (i, (flag, out)) in self.outputs.iter().enumerate() {
            // `o.st/` names a folder the OS will not find in a file `o.st`; the write
            // failed only after the run.
            if out.as_os_str().as_encoded_bytes().ends_with(b"/") {
                bail!(
                    "{flag} {}: expected a file path to write, found a path ending in /",
                    out.display()
                );
            }
            if out.is_dir() {
                bail!(
                    "{flag} {}: expected a file path to write, found a directory",
                    out.display()
                );
            }
            // The same file as an input or an earlier output: named as such first.
            let id = file_id(out);
            for (iflag, inp) in &self.inputs {
                if inp.exists() && file_id(inp) == id {
                    bail!(
                        "{flag} {}: is the same file as {iflag} {}; writing it would destroy the input (choose another output path)",
                        out.display(),
                        inp.display()
                    );
                }
            }
            for (oflag, other) in &self.outputs[..i] {
                if file_id(other) == id {
                    bail!(
                        "{flag} {}: is the same file as {oflag} {}; one output would overwrite the other (choose two paths)",
                        out.display(),
                        other.display()
                    );
                }
            }
            // A missing folder (or a file in its place), devices, FIFOs and sockets (a link
            // is replaced, not followed).
            engram::atomic::check_output(out).map_err(|e| anyhow::anyhow!("{flag}: {e}"))?;
            let dir = match out.parent() {
                Some(d) if !d.as_os_str().is_empty() => d,
                _ => Path::new("."),
            };
            // A folder the run cannot write into fails now, naming the option, not after
            // the run, naming the temporary file the output is staged in.
            probe_writable(dir).map_err(|e| {
                anyhow::anyhow!(
                    "{flag} {}: expected a folder this run can write into, found {} ({e})",
                    out.display(),
                    dir.display()
                )
            })?;
        }
        Ok(())
    }
}

/// Creates and removes a probe file in `dir`: whether this process can create files there.
/// The name is unique to the process and the call (a name left by another process is
/// skipped), and a probe that cannot be removed is reported as a warning.
fn probe_writable(dir: &Path) -> std::io::Result<()> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let probe = dir.join(format!(".engram-probe-{}-{n}", std::process::id()));
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&probe)
        {
            Ok(f) => {
                drop(f);
                if let Err(e) = std::fs::remove_file(&probe) {
                    eprintln!(
                        "warning: could not remove the probe file {}: {e}",
                        probe.display()
                    );
                }
                return Ok(());
            }
            // Left by an earlier process of the same id: try the next name.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && n < 1 << 20 => continue,
            Err(e) => return Err(e),
        }
    }
}

/// The input files a config names besides itself: a tokenizer file or folder given by path.
fn tokenizer_files(name_or_path: &str) -> Vec<PathBuf> {
    let p = Path::new(name_or_path);
    if p.is_file() {
        // The tokenizer reads its sibling config too, where there is one.
        let sibling = p.with_file_name("tokenizer_config.json");
        std::iter::once(p.to_path_buf())
            .chain(sibling.is_file().then_some(sibling))
            .collect()
    } else if p.is_dir() {
        ["tokenizer.json", "tokenizer_config.json"]
            .iter()
            .map(|f| p.join(f))
            .filter(|f| f.exists())
            .collect()
    } else {
        Vec::new()
    }
}

/// Most worker threads allowed: this multiple of the cores.
pub const MAX_THREADS_PER_CORE: usize = 4;

/// The thread count to use for `requested` (from `source`: `--threads` or
/// `RAYON_NUM_THREADS`): at most [`MAX_THREADS_PER_CORE`] × the cores, with one warning
/// line naming `source` when capped.
pub fn thread_count(requested: usize, source: &str) -> Result<usize> {
    if requested == 0 {
        bail!("{source}: expected at least 1, found 0");
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let max = cores * MAX_THREADS_PER_CORE;
    if requested > max {
        eprintln!(
            "warning: {source} {requested} capped at {max} ({MAX_THREADS_PER_CORE} x the {cores} cores)"
        );
        return Ok(max);
    }
    Ok(requested)
}

/// The thread count `RAYON_NUM_THREADS` asks for: `None` when it is unset or 0 (rayon's
/// default: every core), an error naming it when it is not a whole number (rayon would
/// ignore it silently).
pub fn rayon_env_threads() -> Result<Option<usize>> {
    match std::env::var("RAYON_NUM_THREADS") {
        Err(std::env::VarError::NotPresent) => Ok(None),
        Ok(v) => match v.trim().parse::<usize>() {
            Ok(0) => Ok(None),
            Ok(n) => Ok(Some(n)),
            Err(_) => bail!(
                "environment variable RAYON_NUM_THREADS: expected a whole number of threads \
                 (0: every core), found {v:?}"
            ),
        },
        Err(std::env::VarError::NotUnicode(v)) => bail!(
            "environment variable RAYON_NUM_THREADS: expected a whole number of threads \
             (0: every core), found {v:?} (not UTF-8)"
        ),
    }
}

/// Lets a closed stdout (`engram weights W | head -1`) end the process quietly, as it does
/// for other command-line tools, instead of a panic in `println!`. And ignores SIGXFSZ, so
/// that a write past the file-size limit (`ulimit -f`) fails with an error naming the file
/// (its temporary file removed) instead of killing the process.
pub fn default_sigpipe() {
    #[cfg(unix)]
    // SAFETY: setting the dispositions of SIGPIPE and SIGXFSZ at the start of `main`,
    // before any thread is spawned; no handler runs Rust code.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
}

/// On SIGINT, SIGTERM or SIGHUP, removes the temporary files of the writes in flight
/// ([`engram::atomic::remove_staged`]) and then ends the process as the signal's default
/// action would (the shell sees 130, 143 or 129): an interrupted write leaves the old file
/// and nothing beside it. The handler runs on a thread of its own, not in signal context.
pub fn clean_up_on_signals() {
    #[cfg(unix)]
    {
        use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
        // A signal ignored when the process started stays ignored (`nohup` ignores SIGHUP; a
        // shell's background job, SIGINT).
        let ignored = |sig: libc::c_int| {
            // SAFETY: reads the signal's current action into a zeroed struct; passing a null
            // new action changes nothing.
            unsafe {
                let mut old: libc::sigaction = std::mem::zeroed();
                libc::sigaction(sig, std::ptr::null(), &mut old) == 0
                    && old.sa_sigaction == libc::SIG_IGN
            }
        };
        let wanted: Vec<libc::c_int> = [SIGINT, SIGTERM, SIGHUP]
            .into_iter()
            .filter(|&s| !ignored(s))
            .collect();
        // Best effort: without the handler a signal still ends the process, leaving at
        // worst a stray temporary file (removed by a later write, see `engram::atomic`).
        let Ok(mut signals) = signal_hook::iterator::Signals::new(wanted) else {
            return;
        };
        std::thread::spawn(move || {
            if let Some(sig) = signals.forever().next() {
                engram::atomic::remove_staged();
                // Ends the process as the signal itself would have.
                let _ = signal_hook::low_level::emulate_default_handler(sig);
                std::process::exit(128 + sig);
            }
        });
    }
}

/// A memory-mapped input (weights, a checkpoint, a table read with `--table-io mmap`) cut
/// short while this run reads it: the kernel raises SIGBUS (`BUS_ADRERR`) at the first page
/// past the file's new end, which would end the run with "Bus error" and a core dump. This
/// handler writes one `error:` line instead, removes the staged output files and exits with
/// status 1. Any other SIGBUS takes its default action.
pub fn report_truncated_mappings() {
    #[cfg(target_os = "linux")]
    // SAFETY: installs a handler that calls only async-signal-safe functions (`write`,
    // `unlink` through `remove_staged_now`, which takes no lock it would wait on, `signal`,
    // `raise`, `_exit`); the struct is zeroed, then its fields set as `sigaction` expects.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_bus_error as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGBUS, &sa, std::ptr::null_mut());
    }
}

#[cfg(target_os = "linux")]
extern "C" fn on_bus_error(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo to an SA_SIGINFO handler.
    let code = unsafe { info.as_ref() }.map_or(0, |i| i.si_code);
    if code == libc::BUS_ADRERR {
        let line: &[u8] = b"error: a memory-mapped input file (weights, inputs, a state or \
            a table; mmap cannot say which) was truncated or became unreadable while this run \
            read it; run again once the files are whole\n";
        // SAFETY: `line` is a static byte string; `write` reads `line.len()` bytes of it.
        unsafe { libc::write(2, line.as_ptr().cast(), line.len()) };
        engram::atomic::remove_staged_now();
        // SAFETY: ends the process at once; takes no pointer.
        unsafe { libc::_exit(1) }
    }
    // SAFETY: restores the default action and raises the signal again, which ends the
    // process as the SIGBUS would have.
    unsafe {
        libc::signal(libc::SIGBUS, libc::SIG_DFL);
        libc::raise(libc::SIGBUS);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_file_by_link_and_spelling() {
        let d = std::env::temp_dir().join(format!("engram-guard-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let a = d.join("a.bin");
        std::fs::write(&a, b"x").unwrap();
        let dotted = d.join(".").join("a.bin");
        let ok = Files::new()
            .input("--in", Some(&a))
            .output("--out", Some(&dotted));
        assert!(ok.check().unwrap_err().to_string().contains("same file"));
        #[cfg(unix)]
        {
            let link = d.join("link.bin");
            let _ = std::fs::remove_file(&link);
            std::os::unix::fs::symlink(&a, &link).unwrap();
            let f = Files::new()
                .input("--in", Some(&a))
                .output("--out", Some(&link));
            assert!(f.check().is_err());
        }
        let (n1, n2) = (d.join("new1.bin"), d.join("./new1.bin"));
        let f = Files::new()
            .output("--out", Some(&n1))
            .output("--state-out", Some(&n2));
        assert!(f.check().unwrap_err().to_string().contains("--state-out"));
        let fine = Files::new()
            .input("--in", Some(&a))
            .output("--out", Some(&n1));
        fine.check().unwrap();
        let missing = d.join("no/such/dir/out.bin");
        let f = Files::new().output("--out", Some(&missing));
        assert!(f.check().unwrap_err().to_string().contains("no folder"));
        let f = Files::new().output("--out", Some(&d));
        assert!(f.check().unwrap_err().to_string().contains("directory"));
    }

    #[test]
    fn threads_are_capped() {
        assert!(thread_count(0, "--threads").is_err());
        assert_eq!(thread_count(1, "--threads").unwrap(), 1);
        let cores = std::thread::available_parallelism().unwrap().get();
        assert_eq!(
            thread_count(100_000, "--threads").unwrap(),
            cores * MAX_THREADS_PER_CORE
        );
    }
}
