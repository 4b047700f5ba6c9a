//! Large zeroed buffers backed by transparent huge pages where the OS offers them.

/// A zeroed `Vec<f32>` of `n` elements. On Linux the range is advised for transparent huge
/// pages, so that first touch of a multi-GB table costs 512× fewer page faults.
pub fn zeroed_f32(n: usize) -> Vec<f32> {
    let v = vec![0.0f32; n];
    #[cfg(target_os = "linux")]
    advise_huge(v.as_ptr() as usize, n * 4);
    v
}

/// A zeroed `Vec<u16>` (bf16 storage), huge-page advised like [`zeroed_f32`].
pub fn zeroed_u16(n: usize) -> Vec<u16> {
    let v = vec![0u16; n];
    #[cfg(target_os = "linux")]
    advise_huge(v.as_ptr() as usize, n * 2);
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
        // SAFETY: [start, end) lies inside the live allocation `v` (rounded inwards to 2 MiB);
        // MADV_HUGEPAGE only changes how the kernel backs those pages, not their contents.
        unsafe {
            libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
        }
    }
}
