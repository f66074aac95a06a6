//! The process allocator: mimalloc, installed by the `tollgate` binary (src/main.rs), with the
//! settings a long-running server watched by its RSS needs (bench/README.md, "Memory").

use std::alloc::{GlobalAlloc, Layout};
use std::cell::Cell;
use std::os::raw::{c_int, c_void};
use std::sync::atomic::{AtomicU64, Ordering};

use libmimalloc_sys as mi;
use libsqlite3_sys as ffi;

/// mimalloc as the global allocator, asking for an alignment only when a plain block may not
/// have it. The `mimalloc` crate's allocator passes every Rust allocation to
/// `mi_malloc_aligned`, whose fast path in mimalloc v3 takes a block only if the free one at
/// hand happens to be aligned and is skipped for anything over 1 KiB: a third of tollgate's
/// allocations (futures of a few KiB, buffers) took the generic aligned path, about 200
/// instructions each against a dozen (bench/README.md, "Where the CPU goes"). A plain block
/// already has the alignment when it is at most `MAX_PLAIN_ALIGN` and the size is a multiple
/// of it (every layout of a Rust type is): mimalloc's block sizes are multiples of 8, of 16
/// above 16, and a page's first block is 16-aligned.
pub struct Allocator;

/// mimalloc's `MI_MAX_ALIGN_SIZE`: the alignment its plain blocks of a multiple of it have.
const MAX_PLAIN_ALIGN: usize = 16;

/// Whether a plain block of `size` bytes has the alignment `align`.
fn plain(size: usize, align: usize) -> bool {
    align <= MAX_PLAIN_ALIGN && size.is_multiple_of(align)
}

// SAFETY: every call goes to mimalloc, which returns null or a block of at least the size asked
// for, aligned as asked: through its aligned entry points, or through the plain ones only where
// `plain` holds, whose blocks have that alignment (above). `mi_free` takes blocks of either.
unsafe impl GlobalAlloc for Allocator {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: see the impl.
        unsafe {
            if plain(layout.size(), layout.align()) {
                mi::mi_malloc(layout.size()).cast()
            } else {
                mi::mi_malloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: see the impl.
        unsafe {
            if plain(layout.size(), layout.align()) {
                mi::mi_zalloc(layout.size()).cast()
            } else {
                mi::mi_zalloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: `ptr` came from this allocator, so from mimalloc.
        unsafe { mi::mi_free(ptr.cast()) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `ptr` came from this allocator with `layout`; the new block must have the
        // same alignment, which a plain one has when the new size is a multiple of it too.
        unsafe {
            if plain(new_size, layout.align()) {
                mi::mi_realloc(ptr.cast(), new_size).cast()
            } else {
                mi::mi_realloc_aligned(ptr.cast(), new_size, layout.align()).cast()
            }
        }
    }
}

/// mimalloc v3's `mi_option_purge_delay` (`mi_option_e` in its mimalloc.h; the sys crate
/// exports no constant for it).
const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Makes freed pages go back to the system at once instead of when the thread next allocates,
/// so RSS falls back after a load ends, unless the operator set `MIMALLOC_PURGE_DELAY`. (Idle
/// RSS is kept low by building mimalloc without transparent huge pages, its `no_thp` feature.)
/// Then hands SQLite's allocations to mimalloc too (see [`sqlite_on_mimalloc`]). Call it first
/// thing in `main`, before any database is opened.
pub fn tune() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: mimalloc's options may be set at any time; the number is an option of the
        // version the sys crate builds (pinned in Cargo.lock).
        unsafe { libmimalloc_sys::mi_option_set(PURGE_DELAY, 0) };
    }
    sqlite_on_mimalloc();
}

/// Asks mimalloc to hand the calling thread's wholly free pages back to the system now
/// (`mi_collect(true)`). mimalloc keeps a heap per thread and collects only the caller's, so a
/// server asks every thread through [`release_free_memory_everywhere`]. Costs a walk of the
/// thread's heap; not for the request path.
pub fn release_free_memory() {
    // SAFETY: mi_collect takes no pointers and may be called from any thread at any time.
    unsafe { libmimalloc_sys::mi_collect(true) }
}

/// Bumped by every [`release_free_memory_everywhere`]; a thread that has not collected since
/// the last bump does so when it next goes idle ([`on_worker_park`]).
static RELEASE_EPOCH: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// The last [`RELEASE_EPOCH`] this thread collected for.
    static RELEASED_AT: Cell<u64> = const { Cell::new(0) };
}

/// Once a burst is over (the idle database connections have been closed): frees the calling
/// thread's free pages at once and has every runtime worker free its own when it next parks, so
/// that RSS falls back near its idle figure (bench/README.md, "Memory").
pub fn release_free_memory_everywhere() {
    let epoch = RELEASE_EPOCH.fetch_add(1, Ordering::Relaxed) + 1;
    RELEASED_AT.with(|at| at.set(epoch));
    release_free_memory();
}

/// The runtime's `on_thread_park` hook: a worker about to sleep collects its heap if a release
/// was asked for since it last did. One atomic load otherwise. Returns whether it collected.
pub fn on_worker_park() -> bool {
    let epoch = RELEASE_EPOCH.load(Ordering::Relaxed);
    RELEASED_AT.with(|at| {
        if at.get() == epoch {
            return false;
        }
        at.set(epoch);
        release_free_memory();
        true
    })
}

/// SQLite allocates with the C library's malloc unless told otherwise, and glibc gives each
/// thread that touches it (Tokio's blocking pool runs the SQLite statements) an arena of its
/// own that keeps its freed memory: after a load, about 5 MiB stayed in eight such arenas
/// (bench/README.md, "Memory"). Routed through mimalloc, SQLite's freed pages are purged like
/// the rest. Returns whether SQLite took the setting; it refuses it (and keeps malloc) once it
/// is initialized, which is harmless.
pub fn sqlite_on_mimalloc() -> bool {
    // SAFETY (all five): SQLite calls these only as its malloc/free/realloc/size/roundup, with
    // pointers it got from them (or null, which mimalloc's functions accept); sizes SQLite
    // passes are positive, and mimalloc's 16-byte alignment covers SQLite's 8.
    unsafe extern "C" fn malloc(n: c_int) -> *mut c_void {
        unsafe { libmimalloc_sys::mi_malloc(n.max(0) as usize) }
    }
    unsafe extern "C" fn free(p: *mut c_void) {
        unsafe { libmimalloc_sys::mi_free(p) }
    }
    unsafe extern "C" fn realloc(p: *mut c_void, n: c_int) -> *mut c_void {
        unsafe { libmimalloc_sys::mi_realloc(p, n.max(0) as usize) }
    }
    unsafe extern "C" fn size(p: *mut c_void) -> c_int {
        let n = unsafe { libmimalloc_sys::mi_usable_size(p) };
        c_int::try_from(n).unwrap_or(c_int::MAX)
    }
    extern "C" fn roundup(n: c_int) -> c_int {
        // SAFETY: a pure function of its argument.
        let n = unsafe { libmimalloc_sys::mi_good_size(n.max(0) as usize) };
        c_int::try_from(n).unwrap_or(c_int::MAX)
    }
    extern "C" fn init(_: *mut c_void) -> c_int {
        ffi::SQLITE_OK
    }
    extern "C" fn shutdown(_: *mut c_void) {}
    let methods = ffi::sqlite3_mem_methods {
        xMalloc: Some(malloc),
        xFree: Some(free),
        xRealloc: Some(realloc),
        xSize: Some(size),
        xRoundup: Some(roundup),
        xInit: Some(init),
        xShutdown: Some(shutdown),
        pAppData: std::ptr::null_mut(),
    };
    // SAFETY: SQLITE_CONFIG_MALLOC takes a pointer to a methods struct and copies it before it
    // returns; before sqlite3_initialize it is accepted, after it refused with SQLITE_MISUSE and
    // nothing changes.
    unsafe {
        ffi::sqlite3_config(
            ffi::SQLITE_CONFIG_MALLOC,
            &methods as *const ffi::sqlite3_mem_methods,
        ) == ffi::SQLITE_OK
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_have_the_alignment_asked_for() {
        // Sizes around mimalloc's bins and its 1 KiB small-block limit, every alignment up to
        // a page, each kept alive so that the blocks come from within pages, not their starts.
        let mut held = Vec::new();
        for align in [1, 2, 4, 8, 16, 32, 64, 128, 4096] {
            for size in [
                1, 7, 8, 16, 24, 40, 48, 56, 72, 80, 96, 1000, 1024, 1040, 3256, 70_000,
            ] {
                let size: usize = size.max(align);
                let size = size.div_ceil(align) * align;
                for _ in 0..4 {
                    let layout = Layout::from_size_align(size, align).unwrap();
                    // SAFETY: a non-zero size; each block is freed below with its layout.
                    let p = unsafe { Allocator.alloc(layout) };
                    assert!(!p.is_null());
                    assert_eq!(p as usize % align, 0, "size {size}, align {align}");
                    // SAFETY: as above; grown to a size of the same alignment.
                    let grown = unsafe { Allocator.realloc(p, layout, size * 3) };
                    assert_eq!(grown as usize % align, 0, "grown {size}, align {align}");
                    let grown_layout = Layout::from_size_align(size * 3, align).unwrap();
                    // SAFETY: as above.
                    let z = unsafe { Allocator.alloc_zeroed(layout) };
                    assert_eq!(z as usize % align, 0, "zeroed {size}, align {align}");
                    // SAFETY: `z` holds `size` bytes.
                    assert!(unsafe { std::slice::from_raw_parts(z, size) }
                        .iter()
                        .all(|b| *b == 0));
                    held.push((grown, grown_layout));
                    held.push((z, layout));
                }
            }
        }
        for (p, layout) in held {
            // SAFETY: each came from `Allocator` with this layout.
            unsafe { Allocator.dealloc(p, layout) };
        }
    }

    #[test]
    fn a_parked_thread_collects_once_for_each_release_asked_for() {
        std::thread::spawn(|| {
            // A fresh thread has seen no release unless one was asked for before it started.
            on_worker_park();
            assert!(!on_worker_park(), "nothing asked since the last collect");
            std::thread::spawn(release_free_memory_everywhere)
                .join()
                .unwrap();
            assert!(on_worker_park(), "a release asked on another thread");
            assert!(!on_worker_park(), "and only once");
        })
        .join()
        .unwrap();
    }
}
