//! Figures both load generators (`loadgen`, `grpc-loadgen`) report alike: latencies in whole
//! microseconds and nearest-rank percentiles, so bench/report.py reads their lines the same way.

use std::time::Duration;

use serde_json::json;

/// A duration in whole microseconds, saturating (a u32 holds over an hour).
pub fn us(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
}

/// Nearest-rank percentile of a sorted slice, 0 when empty.
pub fn pct(sorted: &[u32], q: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Sorts `v` and adds `{prefix}p50_us` .. `{prefix}p999_us` and `{prefix}max_us` to `out`.
pub fn summary(prefix: &str, v: &mut [u32], out: &mut serde_json::Map<String, serde_json::Value>) {
    v.sort_unstable();
    for (name, q) in [("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("p999", 0.999)] {
        out.insert(format!("{prefix}{name}_us"), json!(pct(v, q)));
    }
    out.insert(
        format!("{prefix}max_us"),
        json!(v.last().copied().unwrap_or(0)),
    );
}
