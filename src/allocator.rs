//! The process allocator: mimalloc, installed by the `tollgate` binary (src/main.rs), with the
//! setting a long-running server watched by its RSS needs (bench/README.md, "Memory").

/// mimalloc v3's `mi_option_purge_delay` (`mi_option_e` in its mimalloc.h; the sys crate
/// exports no constant for it).
const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Makes freed pages go back to the system at once instead of when the thread next allocates,
/// so RSS falls back after a load ends, unless the operator set `MIMALLOC_PURGE_DELAY`. (Idle
/// RSS is kept low by building mimalloc without transparent huge pages, its `no_thp` feature.)
pub fn tune() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: mimalloc's options may be set at any time; the number is an option of the
        // version the sys crate builds (pinned in Cargo.lock).
        unsafe { libmimalloc_sys::mi_option_set(PURGE_DELAY, 0) };
    }
}
