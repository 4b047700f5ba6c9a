//! Large zeroed buffers that fail with an error instead of aborting, backed by transparent
//! huge pages where the OS offers them and they pay.

use crate::error::{EngramError, Result};
use std::cell::Cell;

thread_local! {
    /// Whether this thread is inside [`fallible`] (no destructor, initialised in place: an
    /// allocator may read it at any time).
    static FALLIBLE: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` with this thread's allocation failures marked as handled by their caller: a
/// global allocator that ends the process when an allocation fails (the CLI's) returns null
/// inside instead, so that a `try_reserve` or checked `alloc` in `f` returns its error.
pub fn fallible<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            let _ = FALLIBLE.try_with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(FALLIBLE.try_with(|c| c.replace(true)).unwrap_or(false));
    f()
}

/// Whether an allocation failing on this thread now is handled by its caller
/// ([`fallible`]); for a global allocator to ask.
pub fn failure_handled() -> bool {
    FALLIBLE.try_with(Cell::get).unwrap_or(false)
}

/// A zeroed `Vec<T>` of `n` elements, or an error naming `what` when the allocation fails
/// (where `vec![0; n]` would abort the process). The memory comes from `alloc_zeroed`, so
/// the OS hands out zero pages lazily. With `huge_pages`, on Linux, ranges of 8 MiB and more
/// are advised for transparent huge pages (512× fewer page faults on first touch): right for
/// a table filled once, wrong for a per-call output, where the kernel's synchronous
/// compaction for huge pages (`defrag=madvise`, the common default) stalled the first
/// writes and cost about 30% of prefill throughput in `engram bench` on our VM.
pub(crate) fn try_zeroed<T: bytemuck::Zeroable>(
    n: usize,
    what: &str,
    huge_pages: bool,
) -> Result<Vec<T>> {
    if n == 0 || std::mem::size_of::<T>() == 0 {
        return Ok(Vec::new());
    }
    let failed = |bytes: String| {
        EngramError::invalid(
            format!("memory for {what}"),
            format!("an allocation of {bytes}"),
            "the allocator refused it (not enough memory)",
        )
    };
    let layout = std::alloc::Layout::array::<T>(n)
        .map_err(|_| failed(format!("{n} x {} bytes", std::mem::size_of::<T>())))?;
    // SAFETY: the layout has a non-zero size (n > 0, size_of::<T>() > 0).
    let ptr = fallible(|| unsafe { std::alloc::alloc_zeroed(layout) }) as *mut T;
    if ptr.is_null() {
        return Err(failed(crate::budget::human(layout.size() as u64)));
    }
    #[cfg(target_os = "linux")]
    if huge_pages {
        advise_huge(ptr as usize, layout.size());
    }
    #[cfg(not(target_os = "linux"))]
    let _ = huge_pages;
    // SAFETY: `ptr` was allocated by the global allocator with `Layout::array::<T>(n)`, the
    // layout `Vec<T>` uses for capacity n; all n elements are zero bytes, a valid `T`
    // (`Zeroable`).
    Ok(unsafe { Vec::from_raw_parts(ptr, n, n) })
}

/// A zeroed `Vec<f32>` of `n` elements ([`try_zeroed`]).
pub(crate) fn zeroed_f32(n: usize, what: &str, huge_pages: bool) -> Result<Vec<f32>> {
    try_zeroed(n, what, huge_pages)
}

/// A zeroed `Vec<u16>` (bf16 storage) of `n` elements ([`try_zeroed`]).
pub(crate) fn zeroed_u16(n: usize, what: &str, huge_pages: bool) -> Result<Vec<u16>> {
    try_zeroed(n, what, huge_pages)
}

/// An empty vector with room for `n` elements whose pages are advised for transparent huge
/// pages before anything is written (Linux; elsewhere a plain `Vec::with_capacity`): for
/// weights packed once and then streamed by every call, where 4 KiB pages would cost a TLB
/// miss every few k steps.
pub(crate) fn huge_capacity<T>(n: usize) -> Vec<T> {
    let v = Vec::with_capacity(n);
    #[cfg(target_os = "linux")]
    advise_huge(v.as_ptr() as usize, n * std::mem::size_of::<T>());
    v
}

#[cfg(target_os = "linux")]
fn advise_huge(addr: usize, len: usize) {
    const HUGE: usize = 2 << 20;
    if len < 4 * HUGE {
        return;
    }
    let start = addr.next_multiple_of(HUGE);
    let end = (addr + len) / HUGE * HUGE;
    if end > start {
        // SAFETY: [start, end) lies inside the live allocation (rounded inwards to 2 MiB);
        // MADV_HUGEPAGE only changes how the kernel backs those pages, not their contents.
        unsafe {
            libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
        }
    }
}

/// A buffer whose first element sits on a 64-byte boundary (a cache line), so that no
/// 64-byte vector load or store of it straddles two lines (each such access costs two),
/// for elements whose size divides 64 (f32, u16, bf16, …; others panic at construction):
/// `Vec` gives no such alignment (a large allocation starts 16 bytes into its page), so the
/// buffer holds a line of spare elements and the data starts at its first aligned one.
///
/// The fused path reads hidden states and writes outputs a row at a time; with rows a
/// multiple of 16 floats (the demo layer's 4096) and the buffers in a `LineAligned`, as
/// PyTorch allocates its tensors, no row straddles a line. In three alternating pairs of
/// `engram bench` runs (AVX-512, demo layer, 4096 tokens, `--vec-buffers` against the
/// default), the gate and the conv took 0.0142-0.0171 thread-s per run with `Vec` buffers
/// and 0.0138-0.0152 with these: about 1%, within that machine's noise.
///
/// ```
/// use engram::LineAligned;
/// let mut out = LineAligned::new(8192, 0.0f32);
/// assert_eq!(out.as_mut_slice().as_ptr() as usize % 64, 0);
/// let hidden = LineAligned::from_slice(&[1.0f32, 2.0, 3.0]);
/// assert_eq!(hidden.as_slice(), &[1.0, 2.0, 3.0]);
/// ```
pub struct LineAligned<T> {
    buf: Vec<T>,
    off: usize,
    len: usize,
    huge: bool,
}

impl<T: Copy> LineAligned<T> {
    /// `len` copies of `fill`.
    pub fn new(len: usize, fill: T) -> Self {
        Self::with(len, fill, false)
    }

    /// A copy of `v`.
    pub fn from_slice(v: &[T]) -> Self
    where
        T: Default,
    {
        let mut a = Self::new(v.len(), T::default());
        a.as_mut_slice().copy_from_slice(v);
        a
    }

    /// `len` copies of `fill`, advised for huge pages (for large buffers filled once).
    pub(crate) fn new_huge(len: usize, fill: T) -> Self {
        Self::with(len, fill, true)
    }

    fn with(len: usize, fill: T, huge: bool) -> Self {
        let size = std::mem::size_of::<T>().max(1);
        assert!(
            64 % size == 0,
            "LineAligned takes elements whose size divides 64 bytes, not {size}"
        );
        let slack = 64usize.div_ceil(size);
        // As `Vec::with_capacity` does for a length past the address space: a panic, never a
        // wrapped (short) buffer.
        let total = len
            .checked_add(slack)
            .expect("LineAligned length overflows usize");
        let mut buf = if huge {
            huge_capacity(total)
        } else {
            Vec::with_capacity(total)
        };
        buf.resize(total, fill);
        let misalign = buf.as_ptr() as usize % 64;
        let off = if misalign == 0 {
            0
        } else {
            (64 - misalign) / size
        };
        LineAligned {
            buf,
            off,
            len,
            huge,
        }
    }

    /// At least `len` elements: a fresh buffer of copies of `fill` when it was shorter (the
    /// old contents are not kept).
    pub(crate) fn ensure(&mut self, len: usize, fill: T) {
        if self.len < len {
            *self = Self::with(len, fill, self.huge);
        }
    }

    /// The elements.
    pub fn as_slice(&self) -> &[T] {
        &self.buf[self.off..self.off + self.len]
    }

    /// The elements, writable.
    pub fn as_mut_slice(&mut self) -> &mut [T] {
        &mut self.buf[self.off..self.off + self.len]
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl<T: Copy> Default for LineAligned<T>
where
    T: Default,
{
    fn default() -> Self {
        Self::new(0, T::default())
    }
}

impl<T: Copy> Clone for LineAligned<T> {
    /// A fresh aligned copy (a cloned `Vec` may sit at another offset from a line).
    fn clone(&self) -> Self {
        let src = self.as_slice();
        // `buf` always holds the slack, so it has a first element to fill with.
        let mut p = Self::with(src.len(), self.buf[0], self.huge);
        p.as_mut_slice().copy_from_slice(src);
        p
    }
}

impl<T> std::fmt::Debug for LineAligned<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LineAligned({} elements)", self.len)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn fallible_marks_only_its_own_scope() {
        assert!(!super::failure_handled());
        let inner = super::fallible(|| super::fallible(super::failure_handled));
        assert!(inner);
        assert!(!super::failure_handled(), "restored after nesting");
        let r = std::panic::catch_unwind(|| super::fallible(|| panic!("unwinds")));
        assert!(r.is_err());
        assert!(!super::failure_handled(), "restored after a panic");
        let other = std::thread::spawn(|| {
            super::fallible(|| std::thread::spawn(super::failure_handled).join().unwrap())
        });
        assert!(!other.join().unwrap(), "per thread");
    }

    #[test]
    fn zeroed_buffers_and_refused_allocations() {
        for huge in [false, true] {
            let v = super::zeroed_f32(3 << 20, "test", huge).unwrap();
            assert!(v.len() == 3 << 20 && v.iter().all(|&x| x == 0.0));
        }
        let e = super::zeroed_u16(usize::MAX / 2, "a huge table", true).unwrap_err();
        assert!(e.to_string().contains("a huge table"), "{e}");
        assert!(super::zeroed_f32(0, "none", false).unwrap().is_empty());
    }

    #[test]
    fn line_aligned_buffers_start_on_a_line_after_growth_and_clone() {
        use super::LineAligned;
        let line = |p: *const u8| (p as usize).is_multiple_of(64);
        for n in [0usize, 1, 15, 16, 1000, 1 << 20] {
            let mut a = LineAligned::new(n, 7u16);
            assert!(a.len() == n && a.as_slice().iter().all(|&x| x == 7));
            assert!(line(a.as_mut_slice().as_ptr().cast()));
            a.ensure(n + 100, 1);
            assert!(a.len() >= n + 100 && line(a.as_slice().as_ptr().cast()));
            let b = a.clone();
            assert_eq!(a.as_slice(), b.as_slice());
            assert!(line(b.as_slice().as_ptr().cast()));
        }
        let h = LineAligned::from_slice(&[1.5f32, -2.0, 3.25]);
        assert_eq!(h.as_slice(), &[1.5, -2.0, 3.25]);
        assert!(line(h.as_slice().as_ptr().cast()) && !h.is_empty());
        // An element size that does not divide 64 could not be aligned: refused.
        assert!(std::panic::catch_unwind(|| LineAligned::new(3, [0.0f32; 3])).is_err());
    }
}
