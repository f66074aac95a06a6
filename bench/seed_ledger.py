#!/usr/bin/env python3
"""Grow a stopped tollgate's database by N usage-ledger rows, for bench/soak.sh.

Usage: seed_ledger.py sqlite PATH ROWS     # writes into the SQLite file
       seed_ledger.py postgres ROWS BENCH_USER_ID BENCH_KEY_ID   # prints SQL and COPY data for psql

The rows look like a month of real traffic: 1,000 users with a key each (created here, ids
from 1,000,001 so they cannot meet the ones tollgate makes), plus the bench's own user ("bench";
SQLite: found in the file; PostgreSQL: ids given) with a tenth of the rows; times spread evenly over the last
30 days in id order, as appends would be; mostly successes with priced tokens, a few
refusals, upstream errors and disconnects; a third streamed. The database must already be
migrated (start tollgate on it once) and tollgate stopped.
"""

import random
import sys
import time

USERS = 1000
FIRST_ID = 1_000_001
DAY_MS = 86_400_000
COLUMNS = (
    "request_id, user_id, key_id, protocol, requested_model, resolved_model, service_type, purpose, "
    "stream, outcome, reason, prompt_tokens, completion_tokens, cost_micros, started_at, finished_at, api"
)
# (reason, outcome, weight): what a gateway's ledger is mostly made of.
REASONS = [
    ("success", "success", 970),
    ("upstream_error", "failure", 8),
    ("upstream_timeout", "failure", 2),
    ("client_disconnected", "abort", 10),
    ("rate_limited", "excluded", 5),
    ("budget_exceeded", "excluded", 3),
    ("invalid_request", "excluded", 2),
]
MODELS = [("up/gpt-bench", 0.15, 0.60, 9), ("up/gpt-big", 2.50, 10.0, 1)]


def users(now_ms):
    """Rows of the seeded users and their keys."""
    for i in range(USERS):
        uid = FIRST_ID + i
        created = now_ms - 60 * DAY_MS + i * 1000
        yield (
            (uid, f"seed-user-{i}", f"Seed user {i}", "api_key", None, False, None, None, created),
            (uid, uid, "seed", f"{random.getrandbits(256):064x}", "tg-...seed", "admin", created, None, None),
        )


def ledger(n, now_ms, bench_user, bench_key):
    """n ledger rows in time order over the last 30 days."""
    rnd = random.Random(12)
    reasons = [r[:2] for r in REASONS]
    weights = [r[2] for r in REASONS]
    span = 30 * DAY_MS
    t0 = now_ms - span
    for i in range(n):
        if rnd.random() < 0.1:
            uid, kid = bench_user, bench_key
        else:
            uid = FIRST_ID + rnd.randrange(USERS)
            kid = uid
        reason, outcome = rnd.choices(reasons, weights)[0]
        model, pin, pout, _ = MODELS[0] if rnd.random() < 0.9 else MODELS[1]
        started = t0 + i * span // n + rnd.randrange(1000)
        if outcome == "excluded":
            prompt = completion = cost = 0
            finished = started + rnd.randrange(1, 5)
        else:
            prompt = rnd.randrange(5, 2000)
            completion = rnd.randrange(1, 800) if reason != "upstream_error" else 0
            cost = round(prompt * pin + completion * pout)
            finished = started + rnd.randrange(50, 5000)
        yield (
            f"{rnd.getrandbits(128):032x}",
            uid,
            kid,
            "http" if rnd.random() < 0.85 else "grpc",
            model,
            model,
            "default",
            None,
            rnd.random() < 0.33,
            outcome,
            reason,
            prompt,
            completion,
            cost,
            started,
            finished,
            "chat_completions" if rnd.random() < 0.95 else "messages",
        )


def seed_sqlite(path, n):
    import sqlite3

    now_ms = int(time.time() * 1000)
    db = sqlite3.connect(path)
    # Nothing else has the file open, so the journal can be off while seeding; WAL after, as
    # tollgate keeps it.
    db.execute("PRAGMA journal_mode = OFF")
    db.execute("PRAGMA synchronous = OFF")
    row = db.execute("SELECT u.id, k.id FROM users u JOIN api_keys k ON k.user_id = u.id WHERE u.external_id = 'bench'").fetchone()
    bench_user, bench_key = row if row else (1, 1)
    with db:
        for u, k in users(now_ms):
            db.execute("INSERT INTO users VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", u)
            db.execute("INSERT INTO api_keys VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", k)
        db.executemany(
            f"INSERT INTO usage_ledger ({COLUMNS}) VALUES ({', '.join('?' * 17)})",
            ledger(n, now_ms, bench_user, bench_key),
        )
    db.execute("PRAGMA journal_mode = WAL")
    db.close()


def text_field(v):
    """A value in COPY's text format (no value here holds a tab or a backslash)."""
    if v is None:
        return "\\N"
    if isinstance(v, bool):
        return "t" if v else "f"
    return str(v)


def seed_postgres(n, bench_user, bench_key):
    now_ms = int(time.time() * 1000)
    out = sys.stdout
    out.write("\\set ON_ERROR_STOP on\nBEGIN;\n")
    for u, k in users(now_ms):
        out.write(
            "INSERT INTO users (id, external_id, name, auth_method, service_type, blocked, blocked_reason, "
            f"blocked_at, created_at) VALUES ({u[0]}, '{u[1]}', '{u[2]}', '{u[3]}', NULL, false, NULL, NULL, {u[8]});\n"
        )
        out.write(
            "INSERT INTO api_keys (id, user_id, name, key_hash, hint, source, created_at, expires_at, revoked_at) "
            f"VALUES ({k[0]}, {k[1]}, '{k[2]}', '{k[3]}', '{k[4]}', '{k[5]}', {k[6]}, NULL, NULL);\n"
        )
    out.write(f"COPY usage_ledger ({COLUMNS}) FROM STDIN WITH (FORMAT text);\n")
    for r in ledger(n, now_ms, bench_user, bench_key):
        out.write("\t".join(text_field(v) for v in r) + "\n")
    out.write("\\.\nCOMMIT;\nANALYZE;\n")


def main():
    if len(sys.argv) == 4 and sys.argv[1] == "sqlite":
        seed_sqlite(sys.argv[2], int(sys.argv[3]))
    elif len(sys.argv) == 5 and sys.argv[1] == "postgres":
        seed_postgres(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
