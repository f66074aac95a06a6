#!/usr/bin/env bash
# Tollgate soak (bench/README.md, "Soak"): the "full" profile (pricing, a budget every request
# is admitted against, RPM/TPM limits) on a database grown by SOAK_SEED_ROWS ledger rows, under
# SOAK_RATE for SOAK_SECS, between two SOAK_REF_SECS reference rounds at the same rate. Reports
# the soak's percentiles, its p99 over the reference round's (stalls from checkpoints, sweeps
# or batch flushes would raise it), the worst 10-s window, and RSS sampled every
# SOAK_SAMPLE_SECS with its growth in MiB/min fitted after the first minute.
#
#   bash bench/soak.sh                                  # 10 minutes at 2,000 RPS, SQLite
#   SOAK_SECS=60 bash bench/soak.sh                     # a short one
#   DB=postgres bash bench/soak.sh                      # PostgreSQL (BENCH_PG_URL)
#
# Talks only to 127.0.0.1; every phase is bounded in time; all children are stopped on exit.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# ---- knobs ---------------------------------------------------------------
SOAK_SECS="${SOAK_SECS:-600}"               # seconds of the soak itself
SOAK_RATE="${SOAK_RATE:-2000}"              # requests/s, soak and reference rounds
SOAK_SEED_ROWS="${SOAK_SEED_ROWS:-1000000}" # ledger rows in the database before it starts
SOAK_REF_SECS="${SOAK_REF_SECS:-5}"         # seconds of each reference round
SOAK_SAMPLE_SECS="${SOAK_SAMPLE_SECS:-10}"  # RSS/CPU sampling interval, and window of the per-window p99
CONNECTIONS="${CONNECTIONS:-64}"
MOCK_WORKERS="${MOCK_WORKERS:-1}"
LOADGEN_WORKERS="${LOADGEN_WORKERS:-1}"
READY_TIMEOUT_SECS="${READY_TIMEOUT_SECS:-60}"
SKIP_BUILD="${SKIP_BUILD:-0}"
BIN_DIR="${BIN_DIR:-$ROOT/target/release}"
TOLLGATE_BIN="${TOLLGATE_BIN:-$BIN_DIR/tollgate}"
EXTRA_CONFIG="${EXTRA_CONFIG:-}"
DB="${DB:-sqlite}"                          # sqlite | postgres
BENCH_PG_URL="${BENCH_PG_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
BENCH_REDIS_URL="${BENCH_REDIS_URL:-redis://127.0.0.1:6379}"
PIN="${PIN:-auto}"
RESULTS_DIR="$ROOT/bench/results"

for tool in python3 curl timeout; do
  command -v "$tool" >/dev/null || { echo "soak.sh: needs $tool" >&2; exit 2; }
done
[[ "$DB" == sqlite || "$DB" == postgres ]] || { echo "soak.sh: DB is sqlite or postgres" >&2; exit 2; }
[[ "$DB" == sqlite ]] || command -v psql >/dev/null || { echo "soak.sh: DB=postgres needs psql" >&2; exit 2; }
LOG_TAG=soak
LOG_PREFIX=soak-
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"

if [[ "$SKIP_BUILD" != 1 ]]; then
  log "building release binaries"
  (cd "$ROOT" && cargo build --release -p tollgate -p tollgate-bench)
fi
for bin in mock-upstream loadgen; do
  [[ -x "$BIN_DIR/$bin" ]] || die "$BIN_DIR/$bin not built"
done
[[ -x "$TOLLGATE_BIN" ]] || die "$TOLLGATE_BIN not built"

mkdir -p "$RESULTS_DIR"
RAW="$RESULTS_DIR/soak.jsonl"
: >"$RAW"
read -r LOADAVG_START _ </proc/loadavg
printf '{"phase":"meta","date":"%s","git":"%s","cores":%s,"db":"%s","pinned":%s,"rate":%s,"soak_secs":%s,"ref_secs":%s,"sample_secs":%s,"seed_rows":%s,"connections":%s,"clk_tck":%s,"loadavg_start":%s}\n' \
  "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo none)" \
  "$(nproc)" "$DB" "$PIN" "$SOAK_RATE" "$SOAK_SECS" "$SOAK_REF_SECS" "$SOAK_SAMPLE_SECS" \
  "$SOAK_SEED_ROWS" "$CONNECTIONS" "$(getconf CLK_TCK)" "$LOADAVG_START" >>"$RAW"

# ---- mock and tollgate ---------------------------------------------------
start_listener mock "${ON_LOAD[@]}" "$BIN_DIR/mock-upstream" --addr 127.0.0.1:0 --workers "$MOCK_WORKERS"
MOCK_ADDR="$LISTEN_ADDR"
log "mock upstream on $MOCK_ADDR (pid $LISTEN_PID)"
declare -A PID_OF=() URL_OF=()
BODY="$TMP/body.json"
printf '{"model":"up/gpt-bench","messages":[{"role":"user","content":"hello"}],"max_tokens":64}' >"$BODY"

# probe: one request by hand; a soak of 401s or 429s would measure nothing.
probe() {
  local code
  code="$(curl -s -o "$TMP/probe.out" -D "$TMP/probe.h" -w '%{http_code}' --max-time 10 \
    -H 'Authorization: Bearer tg-bench-key' -H 'Content-Type: application/json' \
    --data-binary "@$BODY" "${URL_OF[tg-full]}/v1/chat/completions" || true)"
  [[ "$code" == 200 ]] || { head -c 500 "$TMP/probe.out" >&2; echo >&2; die "probe answered $code"; }
  grep -qi '^x-budget-remaining-usd' "$TMP/probe.h" || die "no budget headers: the budget is not on"
}

# The first start migrates the database and creates the bench user, its key and its budget; the
# ledger is then grown with tollgate stopped, and it starts again on the grown database.
DB_URL="$(database_url tg-full)"
start_tollgate full tg-full "$DB_URL"
probe
stop_pid "${PID_OF[tg-full]}"
log "seeding the ledger with $SOAK_SEED_ROWS rows ($DB)"
seed_start=$SECONDS
if [[ "$DB" == sqlite ]]; then
  python3 "$ROOT/bench/seed_ledger.py" sqlite "${DB_URL#sqlite://}" "$SOAK_SEED_ROWS"
else
  read -r bench_user bench_key < <(psql -qtA -F ' ' "$DB_URL" -c \
    "SELECT u.id, k.id FROM users u JOIN api_keys k ON k.user_id = u.id WHERE u.external_id = 'bench' LIMIT 1")
  python3 "$ROOT/bench/seed_ledger.py" postgres "$SOAK_SEED_ROWS" "$bench_user" "$bench_key" |
    psql -q -v ON_ERROR_STOP=1 "$DB_URL" >/dev/null
fi
seed_secs=$((SECONDS - seed_start))
start_tollgate full tg-full "$DB_URL"
PID="${PID_OF[tg-full]}"
rows="$(ledger_rows tg-full)"
log "seeded in $seed_secs s: $rows ledger rows"
printf '{"phase":"seed","rows":%s,"secs":%s}\n' "$rows" "$seed_secs" >>"$RAW"
probe

# loadgen SECS ARGS...: one run at SOAK_RATE, killed if it overstays its own bound.
loadgen() {
  local secs="$1"
  shift
  "${ON_LOAD[@]}" timeout --kill-after=5 "$((secs + 30))" "$BIN_DIR/loadgen" \
    --url "${URL_OF[tg-full]}/v1/chat/completions" --header "Authorization: Bearer tg-bench-key" \
    --body-file "$BODY" --duration-secs "$secs" --connections "$CONNECTIONS" \
    --workers "$LOADGEN_WORKERS" "$@"
}
# reference ROUND: one SOAK_REF_SECS round at SOAK_RATE, recorded as phase "ref".
reference() {
  local line
  line="$(loadgen "$SOAK_REF_SECS" --rate "$SOAK_RATE")" || die "loadgen (reference $1) failed"
  alive "$PID" || { tail -n 30 "$TMP/tg-full.log" >&2; die "tollgate exited"; }
  printf '{"phase":"ref","round":"%s",%s\n' "$1" "${line#\{}" >>"$RAW"
  log "reference round ($1): p99 $(field "$line" p99_us) us, errors $(field "$line" errors)"
}

# Warm-up, unrecorded: opens connections and pools.
loadgen 1 --rate 200 >/dev/null || die "warm-up failed"
reference before

# ---- the soak ------------------------------------------------------------
rss_start="$(rss_kb "$PID")"
log "soak: $SOAK_RATE RPS for $SOAK_SECS s (RSS $((rss_start / 1024)) MiB, sampled every $SOAK_SAMPLE_SECS s)"
loadgen "$SOAK_SECS" --rate "$SOAK_RATE" --window-secs "$SOAK_SAMPLE_SECS" >"$TMP/soak.json" &
lg=$!
t0=$SECONDS
next=0
while alive "$lg"; do
  if ((SECONDS - t0 >= next)); then
    # The machine's CPU ticks and those the host stole (a VM's vCPU descheduled), so that a
    # window's stall can be told from the host's.
    read -r st all <<<"$(host_ticks)"
    printf '{"phase":"sample","t":%s,"rss_kb":%s,"cpu_ticks":%s,"fds":%s,"steal_ticks":%s,"all_ticks":%s}\n' \
      "$((SECONDS - t0))" "$(rss_kb "$PID")" "$(cpu_ticks "$PID")" "$(fd_count "$PID")" \
      "$st" "$all" >>"$RAW"
    next=$((next + SOAK_SAMPLE_SECS))
  fi
  alive "$PID" || { tail -n 30 "$TMP/tg-full.log" >&2; die "tollgate exited during the soak"; }
  sleep 0.5
done
wait "$lg" || die "loadgen (soak) exited with an error"
line="$(head -n 1 "$TMP/soak.json")"
[[ "$line" == \{* ]] || die "loadgen printed no result for the soak"
printf '{"phase":"soak","rss_start_kb":%s,"rss_end_kb":%s,%s\n' "$rss_start" "$(rss_kb "$PID")" "${line#\{}" >>"$RAW"
reference after
printf '{"phase":"end","rows":%s,"panics":%s}\n' "$(ledger_rows tg-full)" \
  "$(grep -ci panic "$TMP/tg-full.log" || true)" >>"$RAW"

python3 "$ROOT/bench/soak_report.py" "$RAW" | tee "$RESULTS_DIR/soak.txt"
log "results in bench/results/soak.txt (raw: bench/results/soak.jsonl)"
