#!/usr/bin/env python3
"""Turn bench/run.sh's raw results (JSON lines) into the results table.

Usage: python3 bench/report.py bench/results/latest.jsonl

Kept apart from run.sh so a saved .jsonl can be re-read without re-running.
"""

import json
import statistics
import sys

PCTS = [("p50", "p50_us"), ("p90", "p90_us"), ("p99", "p99_us"), ("p99.9", "p999_us")]


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


def cpu_us_per_req(rec, clk_tck):
    done = rec["ok"] + rec["non_2xx"]
    if not done:
        return None
    return rec["cpu_ticks"] * 1e6 / clk_tck / done


def main():
    recs = load(sys.argv[1])
    meta = next(r for r in recs if r["phase"] == "meta")
    clk = meta["clk_tck"]
    direct_only = bool(meta["direct_only"])
    out = []
    p = out.append

    p(
        f"tollgate bench  {meta['date']}  git {meta['git']}  {meta['cores']} cores  "
        f"{meta['rounds']} rounds x {meta['round_secs']} s  {meta['connections']} connections"
        + ("  QUICK" if meta["quick"] else "")
        + ("  DIRECT ONLY (tollgate not run)" if direct_only else "")
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

    # Added latency, medians of interleaved rounds.
    ab = [r for r in recs if r["phase"] == "ab"]
    p("")
    p(f"Latency, microseconds (medians of {meta['rounds']} interleaved rounds; added = via - direct)")
    p("   rate  pctl   |  direct     via   added")
    cpu_lines = []
    for rate in sorted({r["rate"] for r in ab}):
        d = [r for r in ab if r["rate"] == rate and r["target"] == "direct"]
        v = [r for r in ab if r["rate"] == rate and r["target"] == "via"]
        for name, k in PCTS:
            dm = med([r[k] for r in d])
            vm = med([r[k] for r in v])
            added = None if dm is None or vm is None else vm - dm
            p(f"{rate:7.0f}  {name:<6} | {fmt(dm)} {fmt(vm)} {fmt(added)}")
        derr = sum(r["errors"] + r["non_2xx"] for r in d)
        verr = sum(r["errors"] + r["non_2xx"] for r in v) if v else None
        p(f"{rate:7.0f}  errors | {fmt(derr)} {fmt(verr)}")
        mock_cpu = med([cpu_us_per_req(r, clk) for r in d])
        tg_cpu = med([cpu_us_per_req(r, clk) for r in v])
        cpu_lines.append(f"{rate:.0f} RPS: tollgate {fmt(tg_cpu, 0)} us, mock alone {fmt(mock_cpu, 0)} us")
    if cpu_lines:
        p("CPU per request (utime+stime / completed requests, medians): " + "; ".join(cpu_lines))

    # Throughput frontier.
    fr = [r for r in recs if r["phase"] == "frontier"]
    if fr:
        limit = meta["frontier_p99_us"]
        p("")
        p(f"Throughput frontier: highest rate with p99 < {limit} us and no errors")
        p("   rate | direct p99   err | via p99      err")
        best = {}
        failed = set()
        for rate in sorted({r["rate"] for r in fr}):
            cells = []
            for t in ("direct", "via"):
                tries = [x for x in fr if x["rate"] == rate and x["target"] == t]
                if not tries:
                    cells.append(f"{'-':>10} {'':>5}")
                    continue
                # A failed step is retried once by run.sh; the better try counts.
                r = min(tries, key=lambda x: (x["errors"] + x["non_2xx"], x["p99_us"]))
                err = r["errors"] + r["non_2xx"]
                good = err == 0 and r["p99_us"] < limit
                if good and t not in failed:
                    best[t] = rate
                elif not good:
                    failed.add(t)
                cells.append(f"{r['p99_us']:>10} {err:>5}{'' if good else ' X'}")
            p(f"{rate:7.0f} | " + " | ".join(cells if not direct_only else cells[:1]))
        top = max(r["rate"] for r in fr)

        def show(t):
            if t not in best:
                return "none"
            return f"{best[t]:.0f} RPS" + (" (not reached: raise FRONTIER_RATES)" if t not in failed and best[t] == top else "")

        line = f"frontier: direct {show('direct')}"
        if not direct_only:
            line += f", via tollgate {show('via')}"
            if "direct" in best and "via" in best:
                line += f", ratio {best['via'] / best['direct']:.2f}"
        p(line)

    # Streaming.
    st = [r for r in recs if r["phase"] == "stream"]
    if st:
        p("")
        p(
            f"Streaming, microseconds ({meta['stream_chunks']} chunks every {meta['stream_interval_ms']} ms, "
            f"{meta['stream_rate']} streams/s, medians of rounds; gap = largest gap between chunks of a stream)"
        )
        p("                |  direct |     via |   added")
        for label, key in [
            ("ttft p50", "ttft_p50_us"),
            ("ttft p99", "ttft_p99_us"),
            ("max gap p50", "gap_p50_us"),
            ("max gap p99", "gap_p99_us"),
            ("total p50", "p50_us"),
        ]:
            d = med([r[key] for r in st if r["target"] == "direct"])
            v = med([r[key] for r in st if r["target"] == "via"])
            a = None if d is None or v is None else v - d
            p(f"{label:>15} | {fmt(d)} | {fmt(v)} | {fmt(a)}")
        for t in ("direct", "via"):
            rs = [r for r in st if r["target"] == t]
            if rs:
                p(
                    f"{t}: {sum(r['ok'] for r in rs)} streams ok, "
                    f"{sum(r['errors'] + r['non_2xx'] for r in rs)} failed, "
                    f"{sum(r['gap_over_limit'] for r in rs)} with a gap over "
                    f"{10 * meta['stream_interval_ms']} ms (10x the pacing)"
                )

    # Memory of tollgate.
    if not direct_only:
        rss = {r["at"]: r["kb"] for r in recs if r["phase"] == "rss"}

        def peak(phase):
            vals = [r["rss_peak_kb"] for r in recs if r["phase"] == phase and r["target"] == "via"]
            return max(vals) if vals else None

        def mib(kb):
            return "-" if kb is None else f"{kb / 1024:.1f} MiB"

        p("")
        p(
            f"tollgate RSS: idle {mib(rss.get('idle'))}, under load {mib(peak('ab'))} "
            f"(frontier peak {mib(peak('frontier'))}, streaming peak {mib(peak('stream'))}), "
            f"after load {mib(rss.get('after'))}"
        )
    print("\n".join(out))


if __name__ == "__main__":
    main()
