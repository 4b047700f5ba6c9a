//! Large zeroed buffers that fail with an error instead of aborting, backed by transparent
//! huge pages where the OS offers them and they pay.

use crate::error::{EngramError, Result};

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
    let ptr = unsafe { std::alloc::alloc_zeroed(layout) } as *mut T;
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

#[cfg(test)]
mod tests {
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
}
