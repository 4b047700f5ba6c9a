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
use std::fmt::Write;
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
    // `write!` into a stack buffer: `core::fmt` allocates nothing.
    let _ = match engram::budget::address_space_limit() {
        Some(limit) => writeln!(
            line,
            "error: out of memory: an allocation of {bytes} bytes failed (address-space limit \
             `ulimit -v` {} KiB; this run needs more)",
            limit / 1024
        ),
        None => writeln!(
            line,
            "error: out of memory: an allocation of {bytes} bytes failed (more than the memory \
             and swap this process may use)"
        ),
    };
    // SAFETY: `line.buf[..line.len]` is initialised memory owned by this frame; `write`
    // reads at most `line.len` bytes of it.
    unsafe {
        libc::write(2, line.buf.as_ptr().cast(), line.len);
    }
    engram::atomic::remove_staged_now();
    // SAFETY: as above.
    unsafe { libc::_exit(1) }
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
}

impl std::fmt::Write for Line {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.push(s.as_bytes());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_is_cut_at_its_buffer() {
        use std::fmt::Write;
        let mut l = Line::new();
        write!(l, "a {} {}", 0, u64::MAX).unwrap();
        assert_eq!(&l.buf[..l.len], b"a 0 18446744073709551615");
        let mut full = Line::new();
        full.push(&[b'x'; 300]);
        assert_eq!(full.len, 256);
    }
}
