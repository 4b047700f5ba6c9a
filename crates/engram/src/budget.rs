//! What a command will need, computed before anything is allocated, and checked against
//! what this machine can give (available memory, free disk space).
//!
//! A [`MemoryPlan`] lists the large buffers of a run (table, packed weights, inputs,
//! outputs, per-thread scratch) with checked arithmetic; [`MemoryPlan::check`] refuses a
//! plan larger than the memory available now, naming its largest part.

use crate::config::EngramConfig;
use crate::error::{EngramError, Result};
use std::path::Path;

/// The large buffers of a run: (what, bytes).
#[derive(Debug, Clone, Default)]
pub struct MemoryPlan {
    parts: Vec<(String, u64)>,
}

pub use crate::error::human;

impl MemoryPlan {
    /// An empty plan.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `count` elements of `elem_bytes` each; overflow is an error naming `what`.
    pub fn add(&mut self, what: impl Into<String>, count: u64, elem_bytes: u64) -> Result<()> {
        let what = what.into();
        let bytes = count.checked_mul(elem_bytes).ok_or_else(|| {
            EngramError::invalid(
                what.clone(),
                "a size that fits in 64 bits",
                format!("{count} elements of {elem_bytes} bytes"),
            )
        })?;
        self.parts.push((what, bytes));
        Ok(())
    }

    /// Adds the product of `dims` elements of `elem_bytes` each.
    pub fn add_dims(
        &mut self,
        what: impl Into<String>,
        dims: &[u64],
        elem_bytes: u64,
    ) -> Result<()> {
        let what = what.into();
        let count = dims
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .ok_or_else(|| {
                EngramError::invalid(
                    what.clone(),
                    "a size that fits in 64 bits",
                    format!("shape {dims:?}"),
                )
            })?;
        self.add(what, count, elem_bytes)
    }

    /// The buffers planned so far.
    pub fn parts(&self) -> &[(String, u64)] {
        &self.parts
    }

    /// The total in bytes (saturating).
    pub fn total(&self) -> u64 {
        self.parts
            .iter()
            .fold(0u64, |a, (_, b)| a.saturating_add(*b))
    }

    /// Refuses the plan when it needs more than the memory available now (Linux:
    /// `MemAvailable` plus free swap; elsewhere nothing is checked).
    pub fn check(&self) -> Result<()> {
        match available_memory() {
            Some(avail) => self.check_against(avail),
            None => Ok(()),
        }
    }

    /// Refuses the plan when it needs more than `available` bytes.
    pub fn check_against(&self, available: u64) -> Result<()> {
        let total = self.total();
        if total <= available {
            return Ok(());
        }
        let (what, bytes) = self
            .parts
            .iter()
            .max_by_key(|(_, b)| *b)
            .cloned()
            .unwrap_or_default();
        Err(EngramError::Resource {
            resource: "memory".into(),
            needed: total,
            available,
            detail: format!("the largest part is {what} ({})", human(bytes)),
        })
    }
}

/// Bytes of memory available to a new allocation now (Linux): `MemAvailable + SwapFree` from
/// `/proc/meminfo`, lowered to what this process's cgroup (v2 `memory.max` less
/// `memory.current`, as in a container) and its address-space limit (`ulimit -v`, less the
/// address space already mapped) leave; `None` where unknown.
pub fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = text.lines().find(|l| l.starts_with(name))?;
        let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        kb.checked_mul(1024)
    };
    let avail = field("MemAvailable:")?;
    let system = avail.saturating_add(field("SwapFree:").unwrap_or(0));
    Some(
        [Some(system), cgroup_headroom(), address_space_headroom()]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(system),
    )
}

/// What this process's cgroup lets it allocate more, where it has a memory limit: v2
/// `memory.max`, or v1 `memory.limit_in_bytes` (whose "no limit" is a value near 2^63, which
/// never wins the minimum), less the usage without its inactive file pages: page cache
/// charged to the cgroup (the weights just read) is reclaimed on demand, as `MemAvailable`
/// counts it. A container without its own cgroup namespace sees its cgroup at the mount's
/// root, tried when the listed path is not there.
fn cgroup_headroom() -> Option<u64> {
    let cg = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let at = |root: &str, rel: &str| -> Option<std::path::PathBuf> {
        let listed = Path::new(root).join(rel.trim_start_matches('/'));
        [listed, Path::new(root).to_path_buf()]
            .into_iter()
            .find(|d| d.is_dir())
    };
    let read = |d: &Path, f: &str| std::fs::read_to_string(d.join(f)).ok();
    let v1 = cg
        .lines()
        .find_map(|l| {
            let mut parts = l.splitn(3, ':');
            let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
            controllers
                .split(',')
                .any(|c| c == "memory")
                .then_some(path)
        })
        .and_then(|rel| at("/sys/fs/cgroup/memory", rel))
        .and_then(|d| {
            headroom_of(
                &read(&d, "memory.limit_in_bytes")?,
                &read(&d, "memory.usage_in_bytes")?,
                &read(&d, "memory.stat").unwrap_or_default(),
                "total_inactive_file",
            )
        });
    let v2 = cg
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .and_then(|rel| at("/sys/fs/cgroup", rel))
        .and_then(|d| {
            headroom_of(
                &read(&d, "memory.max")?,
                &read(&d, "memory.current")?,
                &read(&d, "memory.stat").unwrap_or_default(),
                "inactive_file",
            )
        });
    [v1, v2].into_iter().flatten().min()
}

/// `limit - (usage - inactive file pages)` from a cgroup's files' text; `None` without a
/// limit (v2's `max` does not parse) or with unreadable values.
fn headroom_of(limit: &str, usage: &str, stat: &str, inactive_key: &str) -> Option<u64> {
    let limit: u64 = limit.trim().parse().ok()?;
    let usage: u64 = usage.trim().parse().ok()?;
    let inactive: u64 = stat
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(' ')?;
            (k == inactive_key).then(|| v.trim().parse().ok()).flatten()
        })
        .unwrap_or(0);
    Some(limit.saturating_sub(usage.saturating_sub(inactive)))
}

/// The address-space limit (`RLIMIT_AS`, `ulimit -v`) in bytes, where one is set (Linux).
/// Allocates nothing: an allocator that has just failed may ask.
pub fn address_space_limit() -> Option<u64> {
    #[cfg(target_os = "linux")]
    {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: `lim` is a valid, writable rlimit; getrlimit writes only into it.
        if unsafe { libc::getrlimit(libc::RLIMIT_AS, &mut lim) } != 0
            || lim.rlim_cur == libc::RLIM_INFINITY
        {
            return None;
        }
        #[allow(clippy::unnecessary_cast)] // rlim_t is not u64 on every Linux target
        Some(lim.rlim_cur as u64)
    }
    #[cfg(not(target_os = "linux"))]
    None
}

/// The address-space limit ([`address_space_limit`]) less the address space mapped now
/// (`VmSize`).
fn address_space_headroom() -> Option<u64> {
    let limit = address_space_limit()?;
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmSize:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(limit.saturating_sub(kb.saturating_mul(1024)))
}

/// Free bytes for an unprivileged writer on the file system holding `dir`; `None` where
/// unknown.
pub fn free_disk(dir: &Path) -> Option<u64> {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::ffi::OsStrExt;
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
        let mut st = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
        // SAFETY: `c` is a NUL-terminated path and `st` a writable statvfs; statvfs writes
        // only into it and we read it only when the call succeeded.
        let rc = unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) };
        if rc != 0 {
            return None;
        }
        // SAFETY: statvfs returned 0, so it filled the struct.
        let st = unsafe { st.assume_init() };
        // The field types differ between targets (u32 on some 32-bit ones).
        #[allow(clippy::unnecessary_cast)]
        (st.f_bavail as u64).checked_mul(st.f_frsize as u64)
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = dir;
        None
    }
}

/// Refuses to write `bytes` into the folder of `dest` when its file system has less free.
pub fn check_disk(dest: &Path, bytes: u64) -> Result<()> {
    let dir = dest.parent().unwrap_or(Path::new("."));
    match free_disk(dir) {
        Some(free) if free < bytes => Err(EngramError::Resource {
            resource: format!("disk space in {}", display_dir(dir)),
            needed: bytes,
            available: free,
            detail: format!("to write {}", dest.display()),
        }),
        _ => Ok(()),
    }
}

fn display_dir(dir: &Path) -> String {
    if dir.as_os_str().is_empty() {
        ".".into()
    } else {
        dir.display().to_string()
    }
}

/// Rows per tile of the fused path's scratch (the largest tile any kernel uses).
const TILE_ROWS: u64 = 256;

/// How a forward run will be made, for [`forward_plan`].
#[derive(Debug, Clone, Copy)]
pub struct RunShape {
    /// Tokens in all sequences together.
    pub tokens: u64,
    /// Sequences (each carries a state).
    pub sequences: u64,
    /// Whether every stage is kept (the reference path, `--all-stages`).
    pub all_stages: bool,
    /// Whether the fused path runs with a bf16 table that must be copied from the file's
    /// f32 table (`table_rows` then counts).
    pub bf16_table_copy: bool,
    /// Table rows (exact when known, else [`crate::LayerSizes::table_rows_estimate`]).
    pub table_rows: u64,
    /// Worker threads.
    pub threads: u64,
    /// Whether the embedding table is held in RAM (initialised, not memory-mapped).
    pub table_in_ram: bool,
    /// Bytes per element of a table held in RAM (4 for f32, 2 for bf16).
    pub table_elem_bytes: u64,
}

/// The memory a forward run needs beyond memory-mapped files: weights decoded and packed,
/// the table where it is held in RAM or copied to bf16, inputs decoded to f32, outputs,
/// states and per-thread tile scratch.
pub fn forward_plan(cfg: &EngramConfig, run: &RunShape) -> Result<MemoryPlan> {
    let s = cfg.sizes()?;
    let mut p = MemoryPlan::new();
    let tb = if run.bf16_table_copy {
        2
    } else {
        run.table_elem_bytes
    };
    if run.table_in_ram || run.bf16_table_copy {
        p.add_dims(
            "the embedding table",
            &[run.table_rows, cfg.head_dim() as u64],
            tb,
        )?;
    }
    // Decoded f32 projections plus their packed copy.
    p.add("the projection weights", s.proj_weights, 8)?;
    // Conv weight [HC·D, K]; norm1, norm2 and the conv norms [HC, D] each; the biases.
    let (d, hc) = (cfg.hidden_size as u64, cfg.hc_mult as u64);
    let small = s
        .row_width
        .saturating_mul(cfg.kernel_size as u64)
        .saturating_add(3 * s.row_width)
        .saturating_add(d.saturating_mul(1 + hc));
    p.add("the conv weight, norms and biases", small, 4)?;
    p.add_dims("the input hidden_states", &[run.tokens, s.row_width], 4)?;
    p.add("the input ids", run.tokens, 16)?;
    p.add_dims("the output hash_ids", &[run.tokens, s.heads], 8)?;
    p.add_dims(
        "the outputs gates and output",
        &[run.tokens, s.row_width + cfg.hc_mult as u64],
        4,
    )?;
    if run.all_stages {
        // embeddings [Dm], value [D], keys, gated_value, short_conv [HC·D].
        let per = s
            .memory_width
            .saturating_add(cfg.hidden_size as u64)
            .saturating_add(3 * s.row_width);
        p.add_dims("every stage (--all-stages)", &[run.tokens, per], 4)?;
    }
    p.add_dims("the sequence states", &[run.sequences, s.state_floats], 4)?;
    let scratch = s
        .memory_width
        .saturating_add(s.proj_weights / s.memory_width.max(1))
        .saturating_add(3 * s.row_width);
    p.add_dims(
        "per-thread tile scratch",
        &[run.threads.max(1), TILE_ROWS, scratch],
        4,
    )?;
    Ok(p)
}

/// Bytes of the state-dict file of a layer with `table_rows` rows, floats of `float_bytes`.
pub fn weights_file_bytes(cfg: &EngramConfig, table_rows: u64, float_bytes: u64) -> Result<u64> {
    let s = cfg.sizes()?;
    let d = cfg.hidden_size as u64;
    let hc = cfg.hc_mult as u64;
    let floats = table_rows
        .checked_mul(cfg.head_dim() as u64)
        .and_then(|t| t.checked_add(s.proj_weights))
        .and_then(|t| t.checked_add(d * (1 + hc)))
        .and_then(|t| t.checked_add(s.row_width * cfg.kernel_size as u64))
        .and_then(|t| t.checked_add(3 * hc * d))
        .and_then(|t| t.checked_mul(float_bytes))
        .ok_or_else(|| {
            EngramError::config(
                "engram_vocab_size",
                "a weights file whose size fits in 64 bits",
                format!("{table_rows} table rows"),
            )
        })?;
    // Header and the offsets buffer: a few KB per tensor.
    Ok(floats.saturating_add(64 * 1024 + 256 * hc))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_refuses_what_does_not_fit_and_names_the_largest_part() {
        let mut p = MemoryPlan::new();
        p.add("table", 1000, 4).unwrap();
        p.add_dims("output", &[2, 3, 4], 4).unwrap();
        assert_eq!(p.total(), 4000 + 96);
        p.check_against(5000).unwrap();
        let e = p.check_against(4000).unwrap_err().to_string();
        assert!(e.contains("memory") && e.contains("table"), "{e}");
        assert!(p.add("x", u64::MAX, 2).is_err());
        assert!(p.add_dims("y", &[u64::MAX, 2], 1).is_err());
    }

    #[test]
    fn cgroup_headroom_leaves_out_reclaimable_page_cache() {
        let stat = "anon 100\nfile 900\ninactive_file 700\nactive_file 200\n";
        assert_eq!(
            headroom_of("1000\n", "950\n", stat, "inactive_file"),
            Some(750)
        );
        // No limit (v2 "max"), unreadable text: no headroom to apply.
        assert_eq!(headroom_of("max\n", "950", stat, "inactive_file"), None);
        assert_eq!(headroom_of("1000", "", stat, "inactive_file"), None);
        // v1 names the hierarchy's total; a missing key counts as no cache.
        let v1 = "cache 5\ntotal_inactive_file 300\n";
        assert_eq!(
            headroom_of("1000", "900", v1, "total_inactive_file"),
            Some(400)
        );
        assert_eq!(
            headroom_of("1000", "900", "", "total_inactive_file"),
            Some(100)
        );
        assert_eq!(headroom_of("100", "900", "", "inactive_file"), Some(0));
    }

    #[test]
    fn forward_plan_counts_what_a_run_holds() {
        let cfg = EngramConfig::default();
        let run = RunShape {
            tokens: 1000,
            sequences: 1,
            all_stages: false,
            bf16_table_copy: false,
            table_rows: 10_344_164,
            threads: 2,
            table_in_ram: false,
            table_elem_bytes: 4,
        };
        let p = forward_plan(&cfg, &run).unwrap();
        // Inputs and the output alone: 1000 x 4096 floats each.
        assert!(p.total() > 2 * 1000 * 4096 * 4);
        assert!(p.total() < 200 << 20, "{}", p.total());
        let ram = forward_plan(
            &cfg,
            &RunShape {
                table_in_ram: true,
                ..run
            },
        )
        .unwrap();
        assert!(ram.total() - p.total() == 10_344_164 * 64 * 4);
        let huge = forward_plan(
            &cfg,
            &RunShape {
                tokens: u64::MAX / 2,
                ..run
            },
        );
        assert!(huge.is_err());
    }

    #[test]
    fn machine_limits_are_read() {
        #[cfg(target_os = "linux")]
        {
            assert!(available_memory().unwrap() > 0);
            assert!(free_disk(&std::env::temp_dir()).unwrap() > 0);
            let e = check_disk(&std::env::temp_dir().join("x"), u64::MAX).unwrap_err();
            assert!(e.to_string().contains("disk space"), "{e}");
        }
    }
}
