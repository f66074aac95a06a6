//! The project's own reference docs agree with the code: docs/metrics.md names every metric
//! family the binary registers, and no family that does not exist.

use std::collections::BTreeSet;

/// Family names as registered in src/metrics/mod.rs (`registry.register("requests", ...)` under the
/// `tollgate` prefix). Read from the source because a family with no series yet is absent from
/// a scrape.
fn registered_families() -> BTreeSet<String> {
    let source =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/src/metrics/mod.rs"))
            .expect("src/metrics/mod.rs");
    source
        .split("register(")
        .skip(1)
        .filter_map(|rest| {
            let rest = rest.trim_start().strip_prefix('"')?;
            Some(format!("tollgate_{}", &rest[..rest.find('"')?]))
        })
        .chain(alloc_count_families())
        .collect()
}

/// The families of the benchmark's `alloc-count` build (src/alloc_count.rs:
/// `const ..._FAMILY: &str = "name";`), documented beside the others.
fn alloc_count_families() -> Vec<String> {
    let source =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/src/alloc_count.rs"))
            .expect("src/alloc_count.rs");
    source
        .split("_FAMILY: &str = \"")
        .skip(1)
        .filter_map(|rest| Some(format!("tollgate_{}", &rest[..rest.find('"')?])))
        .collect()
}

#[test]
fn metrics_reference_lists_every_family_and_nothing_else() {
    let families = registered_families();
    assert!(
        families.len() >= 20 && families.contains("tollgate_chat_availability"),
        "the registry is read: {families:?}"
    );
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/metrics.md"))
        .expect("docs/metrics.md");
    // Names in backticks: `tollgate_requests_total`.
    let documented: BTreeSet<String> = doc
        .split('`')
        .skip(1)
        .step_by(2)
        .filter(|s| s.len() > "tollgate_".len() && s.starts_with("tollgate_"))
        .filter(|s| !s.contains([' ', '{']))
        .map(|s| s.trim_end_matches("_total").to_string())
        .collect();
    let missing: Vec<_> = families.difference(&documented).collect();
    assert!(missing.is_empty(), "docs/metrics.md misses {missing:?}");
    let stale: Vec<_> = documented.difference(&families).collect();
    assert!(
        stale.is_empty(),
        "docs/metrics.md names families that do not exist: {stale:?}"
    );
}
