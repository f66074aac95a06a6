//! The process allocator: mimalloc, installed by the `tollgate` binary (src/main.rs), with the
//! two settings a long-running server watched by its RSS needs (bench/README.md, "Memory").

/// mimalloc v3's `mi_option_arena_eager_commit` (`mi_option_e` in its mimalloc.h; the sys
/// crate exports no constant for it).
const ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;
/// mimalloc v3's `mi_option_purge_delay`.
const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Applies the settings, unless the operator set them (`MIMALLOC_ARENA_EAGER_COMMIT`,
/// `MIMALLOC_PURGE_DELAY`). Arena memory is committed as it is used, not a whole arena at
/// once (idle RSS about 20 MiB instead of 35), and freed pages go back to the system at once
/// instead of when the thread next allocates, so RSS falls back after a load ends.
pub fn tune() {
    for (option, env, value) in [
        (ARENA_EAGER_COMMIT, "MIMALLOC_ARENA_EAGER_COMMIT", 0),
        (PURGE_DELAY, "MIMALLOC_PURGE_DELAY", 0),
    ] {
        if std::env::var_os(env).is_none() {
            // SAFETY: mimalloc's options may be set at any time; the numbers are options of
            // the version the sys crate builds (pinned in Cargo.lock).
            unsafe { libmimalloc_sys::mi_option_set(option, value) };
        }
    }
}
