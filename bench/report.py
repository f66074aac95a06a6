#!/usr/bin/env python3
"""Turn bench/run.sh's raw results (JSON lines) into the results table.

Usage: python3 bench/report.py bench/results/latest.jsonl

Targets: "direct" (the mock alone), "bare" (a byte-forwarding proxy in front of
it: the baseline) and each tollgate profile ("tg-min", "tg-full"). "added" is a
target's figure minus direct's; "x bare" is a target's added figure over the
bare proxy's, from the same run. Kept apart from run.sh so a saved .jsonl can
be re-read without re-running.
"""

import json
import statistics
import sys

PCTS = [("p50", "p50_us"), ("p90", "p90_us"), ("p99", "p99_us"), ("p99.9", "p999_us")]
ORDER = ["direct", "bare", "tg-min", "tg-full", "tg-redis"]


def load(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(v, width=7):
    if v is None:
        return "-".rjust(width)
    return f"{v:>{width}.0f}"


def ratio(v, base, width=6):
    if v is None or base is None or base <= 0:
        return "-".rjust(width)
    return f"{v / base:>{width - 1}.2f}x"


def cpu_us_per_req(rec, clk_tck):
    done = rec["ok"] + rec["non_2xx"]
    if not done:
        return None
    return rec["cpu_ticks"] * 1e6 / clk_tck / done


def targets_of(recs):
    seen = {r["target"] for r in recs if "target" in r and r["phase"] in ("ab", "frontier", "stream", "conc", "idle")}
    return [t for t in ORDER if t in seen] + sorted(seen - set(ORDER))


def added_rows(rows, others, p, width=15):
    """Rows of target figures with added = target - direct and x bare: [(label, {target: value})]."""
    for label, by in rows:
        d = by.get("direct")
        cells = []
        base_added = None
        for t in others:
            v = by.get(t)
            a = None if d is None or v is None else v - d
            if t == "bare":
                base_added = a
            cells.append(f"{fmt(v)} {fmt(a, 5)} {ratio(a, base_added) if t != 'bare' else '      '}")
        p(f"{label:>{width}} | {fmt(d)} | " + " | ".join(cells))


def concurrent(recs, meta, targets, others, p):
    """The concurrent-streams phase: STREAM_CONCURRENCY paced streams open at once."""
    cc = [r for r in recs if r["phase"] == "conc"]
    if not cc:
        return
    clk = meta["clk_tck"]
    limit_ms = 10 * meta["stream_interval_ms"]
    p("")
    p(
        f"Concurrent streams, microseconds ({cc[0]['concurrency']} open at once: {cc[0]['rate']:.0f} new/s of "
        f"{meta['stream_chunks']} chunks every {meta['stream_interval_ms']} ms, {cc[0]['connections']} connections; "
        "medians of rounds; added = target - direct)"
    )
    p("                |  direct | " + " | ".join(f"{t:>7} added  x bare" for t in others))
    rows = []
    for label, key in [
        ("ttft p50", "ttft_p50_us"),
        ("ttft p99", "ttft_p99_us"),
        ("max gap p50", "gap_p50_us"),
        ("max gap p99", "gap_p99_us"),
    ]:
        rows.append((label, {t: med([r[key] for r in cc if r["target"] == t]) for t in targets}))
    added_rows(rows, others, p)
    for t in targets:
        rs = [r for r in cc if r["target"] == t]
        if not rs:
            continue
        secs = sum(r["duration_secs"] for r in rs) * clk
        streams = sum(r["ok"] + r["non_2xx"] for r in rs)
        cpu = sum(r["cpu_ticks"] for r in rs) * 1e6 / clk / streams if streams else None
        load = f"mock {100 * sum(r['mock_cpu_ticks'] for r in rs) / secs:.0f}%"
        load += f" + loadgen {100 * sum(r.get('self_cpu_ticks', 0) for r in rs) / secs:.0f}% of core 0"
        p(
            f"{t}: in flight mean {med([r['inflight_mean'] for r in rs]):.0f} (most {max(r['inflight_max'] for r in rs)}), "
            f"{sum(r['ok'] for r in rs)} streams ok, {sum(r['errors'] + r['non_2xx'] for r in rs)} failed, "
            f"{sum(r['gap_over_limit'] for r in rs)} with a gap over {limit_ms} ms, "
            + (f"{fmt(cpu, 0).strip()} us CPU per stream, " if t != "direct" else "")
            + f"load side {load}"
        )


def idle_streams(recs, others, p):
    """The idle-stream phase: RSS per open stream that sends nothing, on a fresh process."""
    idle = [r for r in recs if r["phase"] == "idle"]
    if not idle:
        return
    p("")
    p(
        f"Idle streams ({idle[0]['streams']} open after their first chunk, held {idle[0]['hold_secs']:g} s, "
        "each server fresh): RSS per stream = (RSS once all open - RSS before) / streams opened"
    )
    per = {}
    for r in idle:
        if r["opened"]:
            per[r["target"]] = (max(r["rss_open_kb"], r["rss_held_kb"]) - r["rss_before_kb"]) / r["opened"]
    for t in others:
        for r in (x for x in idle if x["target"] == t):
            kib = per.get(t)
            x = f" ({kib / per['bare']:.2f}x bare)" if kib is not None and t != "bare" and per.get("bare") else ""
            let_go = "yes" if r["released"] else "NO (stuck)"
            extra = ""
            if t.startswith("tg-"):
                extra = (
                    f", ledger rows {r['ledger_rows']}/{r['ledger_expected']}, "
                    f"in progress after {r['in_progress_after']}, panics in log {r['panics']}"
                )
            p(
                f"{t}: {'-' if kib is None else f'{kib:.1f}'} KiB per stream{x}; RSS {r['rss_before_kb'] / 1024:.1f} -> "
                f"{r['rss_open_kb'] / 1024:.1f} MiB (held peak {r['rss_held_kb'] / 1024:.1f}); opened {r['opened']}/{r['streams']}, "
                f"{r['errors']} failed, {r['ended_early']} ended early; TTFT p99 {r['ttft_p99_us']} us; "
                f"let go after close: {let_go} (descriptors {r['fd_before']} -> {r['fd_open']} -> {r['fd_after']}){extra}"
            )


def main():
    recs = load(sys.argv[1])
    meta = next(r for r in recs if r["phase"] == "meta")
    clk = meta["clk_tck"]
    targets = targets_of(recs)
    others = [t for t in targets if t != "direct"]
    out = []
    p = out.append

    p(
        f"tollgate bench  {meta['date']}  git {meta['git']}  {meta['cores']} cores ({meta.get('cpu', '?')})  "
        f"{meta['rounds']} rounds x {meta['round_secs']} s  {meta['connections']} connections  "
        f"db {meta.get('db', 'sqlite')}  "
        + ("pinned: servers on core 1, mock and load on core 0" if str(meta.get("pinned")) == "1" else "unpinned")
        + ("  QUICK" if meta["quick"] else "")
    )
    for r in recs:
        if r["phase"] == "machine":
            p(
                f"machine: load average {meta.get('loadavg_start', '?')} before the run; "
                f"during it {r['busy_pct']}% busy, {r['steal_pct']}% stolen by the host "
                "(high values make wall-clock figures noisy; CPU per request holds up)"
            )
    for r in recs:
        if r["phase"] == "mockcheck":
            ok = r["errors"] + r["non_2xx"] == 0 and r["p99_us"] < meta["frontier_p99_us"]
            p(
                f"mock check: {r['rate']:.0f} RPS alone -> p99 {r['p99_us']} us, "
                f"errors {r['errors'] + r['non_2xx']}: {'PASS' if ok else 'FAIL (mock is a bottleneck)'}"
            )

    # Added latency and CPU, medians of interleaved rounds.
    ab = [r for r in recs if r["phase"] == "ab"]
    if ab:
        p("")
        p(
            f"Latency, microseconds (medians of {meta['rounds']} interleaved rounds); "
            "added = target - direct; x bare = added / bare's added"
        )
        head = "   rate  pctl   |  direct | " + " | ".join(f"{t:>7} added  x bare" for t in others)
        p(head)
        for rate in sorted({r["rate"] for r in ab}):
            by = {t: [r for r in ab if r["rate"] == rate and r["target"] == t] for t in targets}
            for name, k in PCTS:
                d = med([r[k] for r in by["direct"]])
                cells = []
                base_added = None
                for t in others:
                    v = med([r[k] for r in by[t]])
                    added = None if d is None or v is None else v - d
                    if t == "bare":
                        base_added = added
                    cells.append(f"{fmt(v)} {fmt(added, 5)} {ratio(added, base_added) if t != 'bare' else '      '}")
                p(f"{rate:7.0f}  {name:<6} | {fmt(d)} | " + " | ".join(cells))
            errs = [sum(r["errors"] + r["non_2xx"] for r in by[t]) for t in targets]
            p(f"{rate:7.0f}  errors | {fmt(errs[0])} | " + " | ".join(f"{fmt(e)} {'':>5} {'':>6}" for e in errs[1:]))
        p("")
        p("CPU per request, microseconds (utime+stime / completed requests, medians of rounds; x bare)")
        for rate in sorted({r["rate"] for r in ab}):
            cpu = {t: med([cpu_us_per_req(r, clk) for r in ab if r["rate"] == rate and r["target"] == t]) for t in targets}
            cells = [f"mock alone {fmt(cpu.get('direct'), 0)}"]
            for t in others:
                cells.append(f"{t} {fmt(cpu.get(t), 0)}" + (f" ({ratio(cpu.get(t), cpu.get('bare'), 0).strip()})" if t != "bare" else ""))
            p(f"{rate:7.0f} RPS: " + ", ".join(cells))

    # Allocations per request (ALLOCS=1 runs only).
    counted = [r for r in ab if "allocs" in r] if ab else []
    if counted:
        p("")
        p("Heap allocations per request (alloc-count build; medians of rounds; a stream counts as one request)")
        for phase, rows in (("plain", counted), ("stream", [r for r in recs if r["phase"] == "stream" and "allocs" in r])):
            for rate in sorted({r["rate"] for r in rows}):
                cells = []
                for t in others:
                    rs = [r for r in rows if r["rate"] == rate and r["target"] == t]
                    done = [(r, r["ok"] + r["non_2xx"]) for r in rs]
                    n = med([r["allocs"] / d for r, d in done if d])
                    b = med([r["alloc_bytes"] / d for r, d in done if d])
                    if n is not None:
                        cells.append(f"{t} {n:.0f} ({b / 1024:.1f} KiB)")
                if cells:
                    p(f"{phase:>6} {rate:7.0f}/s: " + ", ".join(cells))

    # Throughput frontier.
    fr = [r for r in recs if r["phase"] == "frontier"]
    if fr:
        limit = meta["frontier_p99_us"]
        p("")
        p(f"Throughput frontier: highest rate with p99 < {limit} us and no errors")
        p("   rate | " + " | ".join(f"{t:>8} p99   err" for t in targets))
        best = {}
        failed = set()
        for rate in sorted({r["rate"] for r in fr}):
            cells = []
            for t in targets:
                tries = [x for x in fr if x["rate"] == rate and x["target"] == t]
                if not tries:
                    cells.append(f"{'-':>12} {'':>5}")
                    continue
                # A failed step is retried by run.sh (more often when the host stole CPU
                # during it); the best try counts.
                r = min(tries, key=lambda x: (x["errors"] + x["non_2xx"], x["p99_us"]))
                err = r["errors"] + r["non_2xx"]
                good = err == 0 and r["p99_us"] < limit
                if good and t not in failed:
                    best[t] = rate
                elif not good:
                    failed.add(t)
                stolen = f" ({r['steal_pct']}% stolen)" if r.get("steal_pct", 0) >= 1 else ""
                cells.append(f"{r['p99_us']:>12} {err:>5}{'' if good else ' X'}{stolen}")
            p(f"{rate:7.0f} | " + " | ".join(cells))
        top = max(r["rate"] for r in fr)

        def show(t):
            if t not in best:
                return "none"
            s = f"{best[t]:.0f} RPS"
            if t not in failed and best[t] == top:
                s += " (not reached: raise FRONTIER_RATES)"
            if t not in ("direct", "bare") and "bare" in best:
                s += f" ({best[t] / best['bare']:.2f}x bare)"
            return s

        p("frontier: " + ", ".join(f"{t} {show(t)}" for t in targets))

    # Streaming.
    st = [r for r in recs if r["phase"] == "stream"]
    if st:
        p("")
        p(
            f"Streaming, microseconds ({meta['stream_chunks']} chunks every {meta['stream_interval_ms']} ms, "
            f"{meta['stream_rate']} streams/s, medians of rounds; gap = largest gap between chunks of a stream; "
            "added = target - direct)"
        )
        p("                |  direct | " + " | ".join(f"{t:>7} added  x bare" for t in others))
        for label, key in [
            ("ttft p50", "ttft_p50_us"),
            ("ttft p99", "ttft_p99_us"),
            ("max gap p50", "gap_p50_us"),
            ("max gap p99", "gap_p99_us"),
            ("total p50", "p50_us"),
        ]:
            d = med([r[key] for r in st if r["target"] == "direct"])
            cells = []
            base_added = None
            for t in others:
                v = med([r[key] for r in st if r["target"] == t])
                a = None if d is None or v is None else v - d
                if t == "bare":
                    base_added = a
                cells.append(f"{fmt(v)} {fmt(a, 5)} {ratio(a, base_added) if t != 'bare' else '      '}")
            p(f"{label:>15} | {fmt(d)} | " + " | ".join(cells))
        for t in targets:
            rs = [r for r in st if r["target"] == t]
            if rs:
                p(
                    f"{t}: {sum(r['ok'] for r in rs)} streams ok, "
                    f"{sum(r['errors'] + r['non_2xx'] for r in rs)} failed, "
                    f"{sum(r['gap_over_limit'] for r in rs)} with a gap over "
                    f"{10 * meta['stream_interval_ms']} ms (10x the pacing)"
                )

    concurrent(recs, meta, targets, others, p)
    idle_streams(recs, others, p)

    # Memory.
    def mib(kb):
        return "-" if kb is None else f"{kb / 1024:.1f} MiB"

    mem = [t for t in others]
    if mem:
        p("")
        for t in mem:
            rss = {r["at"]: r["kb"] for r in recs if r["phase"] == "rss" and r.get("target", "tg") == t}

            def peak(phase):
                vals = [r["rss_peak_kb"] for r in recs if r["phase"] == phase and r["target"] == t]
                return max(vals) if vals else None

            idle, after, let_go = rss.get("idle"), rss.get("after"), rss.get("pools_idle")
            back = f" ({after / idle:.2f}x idle)" if idle and after else ""
            if idle and let_go:
                back += f", once the pools closed idle connections {mib(let_go)} ({let_go / idle:.2f}x idle)"
            p(
                f"{t} RSS: idle {mib(idle)}, under load {mib(peak('ab'))} "
                f"(frontier peak {mib(peak('frontier'))}, streaming peak {mib(peak('stream'))}, "
                f"concurrent streams peak {mib(peak('conc'))}), after load {mib(after)}{back}"
            )
    grpc_tables(recs, meta, clk, p)
    print("\n".join(out))


def grpc_tables(recs, meta, clk, p):
    """The gRPC phase: tollgate's Complete and StreamComplete against grpc-bare.

    "added" subtracts the HTTP direct rounds (the mock alone) at the same rate, as the HTTP
    table does, so the ratio compares what each gateway adds rather than the mock's time too;
    with no direct round at that rate the ratio is of the whole figures.
    """
    gab = [r for r in recs if r["phase"] == "grpc-ab"]
    gst = [r for r in recs if r["phase"] == "grpc-stream"]
    if not gab and not gst:
        return
    seen = {r["target"] for r in gab + gst}
    targets = [t for t in ["grpc-bare"] + ORDER if t in seen] + sorted(seen - set(ORDER) - {"grpc-bare"})
    tgs = [t for t in targets if t != "grpc-bare"]
    any_rec = (gab + gst)[0]

    def row(label, rows, direct_rows, key):
        d = med([r[key] for r in direct_rows])
        base = None
        cells = []
        for t in targets:
            v = med([r[key] for r in rows if r["target"] == t])
            a = None if d is None or v is None else v - d
            # Ratios of added figures when there is a direct reference, else of whole ones.
            cmp = a if d is not None else v
            if t == "grpc-bare":
                base = cmp
                cells.append(f"{fmt(v, 9)} {fmt(a, 5)}")
            else:
                cells.append(f"{fmt(v)} {fmt(a, 5)} {ratio(cmp, base)}")
        p(f"{label:>15} | {fmt(d)} | " + " | ".join(cells))

    head = "                |  direct | " + " | ".join(
        f"{t:>7} added" + ("" if t == "grpc-bare" else " x bare") for t in targets
    )
    if gab:
        p("")
        p(
            f"gRPC Complete, microseconds (medians of {meta['rounds']} interleaved rounds; "
            f"{any_rec.get('concurrency', '?')} in flight over {any_rec.get('connections', '?')} HTTP/2 connections); "
            "direct = HTTP to the mock alone at the same rate; added = target - direct; x bare = added / grpc-bare's added"
        )
        p(head)
        ab_direct = [r for r in recs if r["phase"] == "ab" and r["target"] == "direct"]
        for rate in sorted({r["rate"] for r in gab}):
            rows = [r for r in gab if r["rate"] == rate]
            direct = [r for r in ab_direct if r["rate"] == rate]
            for name, k in PCTS:
                row(f"{rate:.0f} {name}", rows, direct, k)
            errs = [sum(r["errors"] + r["non_2xx"] for r in rows if r["target"] == t) for t in targets]
            p(f"{f'{rate:.0f} errors':>15} | {'':>7} | " + " | ".join(
                (f"{e:>9} {'':>5}" if t == "grpc-bare" else f"{e:>7} {'':>5} {'':>6}") for t, e in zip(targets, errs)
            ))
            if not direct:
                p(f"  (no HTTP direct round at {rate:.0f} RPS: x bare is of whole latencies)")
        p("")
        p("gRPC CPU per request, microseconds (utime+stime / completed requests, medians of rounds; x grpc-bare)")
        for rate in sorted({r["rate"] for r in gab}):
            cpu = {t: med([cpu_us_per_req(r, clk) for r in gab if r["rate"] == rate and r["target"] == t]) for t in targets}
            cells = [f"grpc-bare {fmt(cpu.get('grpc-bare'), 0)}"]
            for t in tgs:
                cells.append(f"{t} {fmt(cpu.get(t), 0)} ({ratio(cpu.get(t), cpu.get('grpc-bare'), 0).strip()})")
            p(f"{rate:7.0f} RPS: " + ", ".join(cells))
    if gst:
        rate = gst[0]["rate"]
        p("")
        p(
            f"gRPC StreamComplete, microseconds ({meta['stream_chunks']} chunks every {meta['stream_interval_ms']} ms, "
            f"{rate:.0f} streams/s, medians of rounds; ttft = time to the first message; gap = largest gap between "
            "messages of a stream; direct = HTTP streams from the mock alone; x bare = added / grpc-bare's added)"
        )
        p(head)
        direct = [r for r in recs if r["phase"] == "stream" and r["target"] == "direct" and r["rate"] == rate]
        for label, key in [
            ("ttft p50", "ttft_p50_us"),
            ("ttft p99", "ttft_p99_us"),
            ("max gap p50", "gap_p50_us"),
            ("max gap p99", "gap_p99_us"),
            ("total p50", "p50_us"),
        ]:
            row(label, gst, direct, key)
        cpu = {t: med([cpu_us_per_req(r, clk) for r in gst if r["target"] == t]) for t in targets}
        p(
            "CPU per stream: "
            + ", ".join(
                f"{t} {fmt(cpu.get(t), 0)}" + ("" if t == "grpc-bare" else f" ({ratio(cpu.get(t), cpu.get('grpc-bare'), 0).strip()})")
                for t in targets
            )
        )
        for t in targets:
            rs = [r for r in gst if r["target"] == t]
            if rs:
                p(
                    f"{t}: {sum(r['ok'] for r in rs)} streams ok, "
                    f"{sum(r['errors'] + r['non_2xx'] for r in rs)} failed, "
                    f"{sum(r['gap_over_limit'] for r in rs)} with a gap over "
                    f"{10 * meta['stream_interval_ms']} ms (10x the pacing)"
                )
    peaks = {t: max([r["rss_peak_kb"] for r in gab + gst if r["target"] == t] or [0]) for t in targets}
    p("gRPC phase peak RSS: " + ", ".join(f"{t} {peaks[t] / 1024:.1f} MiB" for t in targets))


if __name__ == "__main__":
    main()
