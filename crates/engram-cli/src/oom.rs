//! The CLI's allocator: the system's, except when an allocation fails where its caller cannot
//! handle the failure (most of `std` and of the crates: a tokenizer being parsed, a `Vec`
//! growing). Rust would then print `memory allocation of N bytes failed` and abort (SIGABRT,
//! a core dump, staged output files left behind). Here the process writes one `error:` line
//! naming the size and the limits that apply, removes its staged output files, and exits
//! with status 1. Allocations inside [`engram::fallible`] (the library's large buffers,
//! the row cache) still see the failure and return their own error, which names the buffer.
//!
//! Large runs are refused before they start by the memory plan (`engram::budget`); this
//! covers what the plan does not count (a tokenizer, thread stacks, allocator arenas) under
//! a tight `ulimit -v` or with overcommit off. A cgroup's limit is enforced by the kernel's
//! OOM killer instead, which no allocator sees.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, Ordering};

/// The system allocator, ending the process cleanly when an allocation fails unhandled.
pub struct Checked;

// SAFETY: every method passes its arguments unchanged to `System`, which upholds
// `GlobalAlloc`'s contract, and returns what `System` returned (a failure is reported only
// after `System` gave null, and the pointer returned is still that null).
unsafe impl GlobalAlloc for Checked {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's layout (non-zero size) is passed on as it came.
        let p = unsafe { System.alloc(layout) };
        if p.is_null() {
            refused(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for `alloc`.
        let p = unsafe { System.alloc_zeroed(layout) };
        if p.is_null() {
            refused(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from this allocator, that is from `System`, with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `ptr` came from `System` with `layout`; `new_size` is the caller's.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if p.is_null() {
            refused(new_size);
        }
        p
    }
}

/// An allocation of `bytes` failed: returns (so the caller sees null) where the failure is
/// handled, else ends the process.
fn refused(bytes: usize) {
    if engram::failure_handled() {
        return;
    }
    out_of_memory(bytes)
}

/// Whether a thread is already ending the process.
static ENDING: AtomicBool = AtomicBool::new(false);

/// Writes the error line, removes the staged output files and exits with status 1, with no
/// allocation on the way (the line is formatted on the stack). A second failure (another
/// thread's, or an allocation inside the removal) waits briefly for the first to finish,
/// then exits too.
fn out_of_memory(bytes: usize) -> ! {
    if ENDING.swap(true, Ordering::SeqCst) {
        std::thread::sleep(std::time::Duration::from_millis(500));
        // SAFETY: `_exit` ends the process at once; it takes no pointer.
        unsafe { libc::_exit(1) }
    }
    let mut line = Line::new();
    line.push(b"error: out of memory: an allocation of ");
    line.number(bytes as u64);
    line.push(b" bytes failed");
    match address_space_limit() {
        Some(kib) => {
            line.push(b" (address-space limit `ulimit -v` ");
            line.number(kib);
            line.push(b" KiB; this run needs more)\n");
        }
        None => line.push(b" (more than the memory and swap this process may use)\n"),
    }
    // SAFETY: `line.buf[..line.len]` is initialised memory owned by this frame; `write`
    // reads at most `line.len` bytes of it.
    unsafe {
        libc::write(2, line.buf.as_ptr().cast(), line.len);
    }
    engram::atomic::remove_staged_now();
    // SAFETY: as above.
    unsafe { libc::_exit(1) }
}

/// `RLIMIT_AS` in KiB, when one is set.
fn address_space_limit() -> Option<u64> {
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
    Some(lim.rlim_cur as u64 / 1024)
}

/// A line built on the stack.
struct Line {
    buf: [u8; 256],
    len: usize,
}

impl Line {
    fn new() -> Self {
        Line {
            buf: [0; 256],
            len: 0,
        }
    }

    /// Appends what fits.
    fn push(&mut self, s: &[u8]) {
        let n = s.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s[..n]);
        self.len += n;
    }

    /// Appends `v` in decimal.
    fn number(&mut self, mut v: u64) {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_is_built_without_allocating() {
        let mut l = Line::new();
        l.push(b"a ");
        l.number(0);
        l.push(b" ");
        l.number(18_446_744_073_709_551_615);
        assert_eq!(&l.buf[..l.len], b"a 0 18446744073709551615");
        let mut full = Line::new();
        full.push(&[b'x'; 300]);
        assert_eq!(full.len, 256);
    }
}
