//! A counting global allocator (around [`crate::allocator::Allocator`], the one the binary
//! installs otherwise), built only with `--features alloc-count` (the benchmark's
//! allocations-per-request figure, bench/README.md): every allocation and reallocation is
//! counted, with its size, in two relaxed atomics, and `/metrics` exports the totals as
//! `tollgate_allocations_total` and `tollgate_allocated_bytes_total`.

use std::alloc::{GlobalAlloc, Layout};

use crate::allocator::Allocator as Inner;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);
static BYTES: AtomicU64 = AtomicU64::new(0);
/// Bytes handed out and not yet freed (what the heap holds live, without the allocator's own
/// free pages and fragmentation: RSS minus this is what the allocator keeps).
static LIVE: AtomicI64 = AtomicI64::new(0);

/// The system allocator, counting.
pub struct CountingAllocator;

#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator;

fn count(size: usize) {
    ALLOCATIONS.fetch_add(1, Relaxed);
    BYTES.fetch_add(size as u64, Relaxed);
    LIVE.fetch_add(size as i64, Relaxed);
}

// SAFETY: every call is forwarded unchanged to mimalloc (what the binary uses otherwise), which upholds the contract.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        // SAFETY: the caller's layout is passed on as given.
        unsafe { Inner.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        // SAFETY: as above.
        unsafe { Inner.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as i64, Relaxed);
        // SAFETY: `ptr` came from `Inner` with this layout.
        unsafe { Inner.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count(new_size);
        LIVE.fetch_sub(layout.size() as i64, Relaxed);
        // SAFETY: `ptr` came from `Inner` with this layout.
        unsafe { Inner.realloc(ptr, layout, new_size) }
    }
}

/// Allocations (and reallocations) so far, and the bytes they asked for.
pub fn totals() -> (u64, u64) {
    (ALLOCATIONS.load(Relaxed), BYTES.load(Relaxed))
}

/// The family names (under the registry's `tollgate` prefix; docs/metrics.md lists them).
const ALLOCATIONS_FAMILY: &str = "allocations";
const BYTES_FAMILY: &str = "allocated_bytes";
const LIVE_FAMILY: &str = "allocated_live_bytes";

/// Exports [`totals`] on every scrape.
#[derive(Debug)]
pub struct AllocationCollector;

impl Collector for AllocationCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let (n, bytes) = totals();
        for (name, help, v) in [
            (
                ALLOCATIONS_FAMILY,
                "Heap allocations and reallocations since start (alloc-count builds only)",
                n,
            ),
            (
                BYTES_FAMILY,
                "Bytes asked for by those allocations (alloc-count builds only)",
                bytes,
            ),
        ] {
            let c = ConstCounter::new(v);
            let e = encoder.encode_descriptor(name, help, None, c.metric_type())?;
            c.encode(e)?;
        }
        let live = ConstGauge::new(LIVE.load(Relaxed).max(0));
        let e = encoder.encode_descriptor(
            LIVE_FAMILY,
            "Heap bytes allocated and not yet freed (alloc-count builds only)",
            None,
            live.metric_type(),
        )?;
        live.encode(e)?;
        Ok(())
    }
}
