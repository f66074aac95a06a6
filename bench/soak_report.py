#!/usr/bin/env python3
"""Turn bench/soak.sh's raw results (JSON lines) into the soak's summary.

Usage: python3 bench/soak_report.py bench/results/soak.jsonl

Kept apart from soak.sh so a saved .jsonl can be re-read without re-running. Figures are
reported, not judged: the targets (bench/README.md) are for the reader to compare with.
"""

import json
import statistics
import sys


def load(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def slope(points):
    """Least-squares slope of [(x, y)]; None with fewer than two distinct x."""
    if len({x for x, _ in points}) < 2:
        return None
    mx = statistics.fmean(x for x, _ in points)
    my = statistics.fmean(y for _, y in points)
    return sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)


def pcts(r):
    return (
        f"p50 {r['p50_us']} us, p99 {r['p99_us']} us, p99.9 {r['p999_us']} us, max {r['max_us']} us; "
        f"{r['ok']} ok, {r['errors'] + r['non_2xx']} errors, {r['late']} late, {r['achieved_rps']:.0f} RPS achieved"
    )


def main():
    recs = load(sys.argv[1])

    def by(phase):
        return [r for r in recs if r["phase"] == phase]

    meta = by("meta")[0]
    out = []
    p = out.append
    p(
        f"tollgate soak  {meta['date']}  git {meta['git']}  {meta['cores']} cores  db {meta['db']}  "
        + ("pinned: tollgate on core 1, mock and load on core 0" if str(meta["pinned"]) == "1" else "unpinned")
        + f"  load average {meta['loadavg_start']} before"
    )
    p(
        f"profile full, {meta['rate']} RPS for {meta['soak_secs']} s, {meta['connections']} connections, "
        f"between two {meta['ref_secs']}-s reference rounds at the same rate"
    )
    for s in by("seed"):
        p(f"ledger before the soak: {s['rows']} rows (seeded in {s['secs']} s)")
    refs = {r["round"]: r for r in by("ref")}
    for name in ("before", "after"):
        if name in refs:
            p(f"reference round {name}: {pcts(refs[name])}")
    soak = by("soak")
    if not soak:
        print("\n".join(out + ["no soak result (the run stopped early)"]))
        return
    s = soak[0]
    p(f"soak: {pcts(s)}")
    for name in ("before", "after"):
        if name in refs and refs[name]["p99_us"] > 0:
            p(f"soak p99 / reference {name} p99: {s['p99_us'] / refs[name]['p99_us']:.2f}x")
    wins = [w for w in s.get("windows", []) if w["w_n"]]
    if wins:
        worst = max(wins, key=lambda w: w["w_p99_us"])
        p(
            f"{len(wins)} windows of {meta['sample_secs']} s: p99 median {statistics.median(w['w_p99_us'] for w in wins):.0f} us, "
            f"worst {worst['w_p99_us']} us (from t = {worst['w_t']:.0f} s; max there {worst['w_max_us']} us), "
            f"errors in {sum(1 for w in wins if w['w_errors'])} windows"
        )

    samples = by("sample")
    p(f"RSS: start {s['rss_start_kb'] / 1024:.1f} MiB, end {s['rss_end_kb'] / 1024:.1f} MiB")
    if samples:
        late = [(x["t"] / 60, x["rss_kb"] / 1024) for x in samples if x["t"] >= 60]
        basis = "after the first minute"
        if len(late) < 3:
            late = [(x["t"] / 60, x["rss_kb"] / 1024) for x in samples if x["t"] >= meta["sample_secs"]]
            basis = f"from t = {meta['sample_secs']} s (the run is too short to leave out the first minute)"
        g = slope(late)
        p(
            "RSS growth: "
            + ("-" if g is None else f"{g:+.3f} MiB/min")
            + f" (least-squares fit over {len(late)} samples {basis}); "
            f"samples min {min(x['rss_kb'] for x in samples) / 1024:.1f}, max {max(x['rss_kb'] for x in samples) / 1024:.1f} MiB"
        )
        if len(samples) >= 2:
            a, b = samples[0], samples[-1]
            if b["t"] > a["t"]:
                cpu = 100 * (b["cpu_ticks"] - a["cpu_ticks"]) / meta["clk_tck"] / (b["t"] - a["t"])
                p(f"tollgate CPU: {cpu:.0f}% of a core; descriptors {a['fds']} -> {b['fds']}")
    steal_of_windows(p, samples, by("soak"))
    for e in by("end"):
        p(f"ledger after: {e['rows']} rows; lines mentioning a panic in tollgate's log: {e['panics']}")
    print("\n".join(out))


def steal_of_windows(p, samples, soaks):
    """The host's steal over the soak, and the windows' p99 split by the steal in them."""
    samples = [x for x in samples if "steal_ticks" in x]
    if len(samples) < 2:
        return

    def share(a, b):
        total = b["all_ticks"] - a["all_ticks"]
        return 100 * (b["steal_ticks"] - a["steal_ticks"]) / total if total > 0 else 0.0

    p(f"host steal: {share(samples[0], samples[-1]):.1f}% of the machine's CPU over the soak")
    calm, stolen = [], []
    for w in (w for s in soaks for w in s.get("windows", []) if w["w_n"]):
        # The samples are taken a window's length apart from the soak's start: the first two
        # at or after the window's start bound it.
        around = [x for x in samples if x["t"] >= w["w_t"]]
        if len(around) >= 2:
            (calm if share(around[0], around[1]) < 1.0 else stolen).append(w["w_p99_us"])
    for name, p99s in (("under 1%", calm), ("1% or more", stolen)):
        if p99s:
            p(
                f"  {len(p99s)} windows with {name} stolen: p99 median "
                f"{statistics.median(p99s):.0f} us, worst {max(p99s)} us"
            )

if __name__ == "__main__":
    main()
