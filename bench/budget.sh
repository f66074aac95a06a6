#!/usr/bin/env bash
# What the budget check costs a request (docs/budgets.md, "Cost of exactness"): the same
# open-loop load, in interleaved rounds, through two tollgates on the same mock upstream that
# differ only in one thing: "on" has a per-user budget (so every request reserves its maximum
# cost in the database before the upstream call and settles after it), "off" has none. Direct
# rounds to the mock are run too, for scale. See bench/README.md.
#
#   bash bench/budget.sh                      # SQLite, 5 rounds x 5 s at 500 RPS
#   DB=postgres bash bench/budget.sh          # PostgreSQL (BENCH_PG_URL, a fresh database each)
#   QUICK=1 bash bench/budget.sh              # smoke run
#
# Talks only to 127.0.0.1; every phase is bounded in time; all children are stopped on exit.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

QUICK="${QUICK:-0}"
if [[ "$QUICK" == 1 ]]; then
  : "${ROUNDS:=1}" "${ROUND_SECS:=2}" "${RATE:=200}"
fi
ROUNDS="${ROUNDS:-5}"
ROUND_SECS="${ROUND_SECS:-5}"
RATE="${RATE:-500}"
CONNECTIONS="${CONNECTIONS:-32}"
LOADGEN_WORKERS="${LOADGEN_WORKERS:-1}"
MOCK_WORKERS="${MOCK_WORKERS:-1}"
DB="${DB:-sqlite}"                                  # sqlite | postgres
BENCH_PG_URL="${BENCH_PG_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
ON_EXTRA="${ON_EXTRA:-}"                            # TOML added to the budgets-on config only
SKIP_BUILD="${SKIP_BUILD:-0}"
BIN_DIR="${BIN_DIR:-$ROOT/target/release}"
TOLLGATE_BIN="${TOLLGATE_BIN:-$BIN_DIR/tollgate}"
RESULTS_DIR="$ROOT/bench/results"

for tool in python3 curl timeout; do
  command -v "$tool" >/dev/null || { echo "budget.sh: needs $tool" >&2; exit 2; }
done
[[ "$DB" == sqlite || "$DB" == postgres ]] || { echo "budget.sh: DB is sqlite or postgres" >&2; exit 2; }
[[ "$DB" == sqlite ]] || command -v psql >/dev/null || { echo "budget.sh: DB=postgres needs psql" >&2; exit 2; }

log() { printf '[budget-bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "FAILED: $*"; exit 1; }

TMP="$(mktemp -d /tmp/tollgate-budget-bench.XXXXXX)"
CHILDREN=()
PG_DBS=()
stop_pid() {
  local pid="$1" i
  kill "$pid" 2>/dev/null || return 0
  for ((i = 0; i < 50; i++)); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  kill -9 "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}
cleanup() {
  local rc=$? pid db
  trap - EXIT INT TERM
  for pid in "${CHILDREN[@]}"; do stop_pid "$pid"; done
  for db in "${PG_DBS[@]}"; do
    psql -q "$BENCH_PG_URL" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1 || true
  done
  mkdir -p "$RESULTS_DIR"
  for f in "$TMP"/tollgate-*.log; do [[ -f "$f" ]] && cp "$f" "$RESULTS_DIR/budget-$(basename "$f")"; done
  rm -rf "$TMP"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

alive() { kill -0 "$1" 2>/dev/null; }
cpu_ticks() {
  local stat
  stat="$(cat "/proc/$1/stat" 2>/dev/null)" || { echo 0; return; }
  awk '{print $12 + $13}' <<<"${stat##*) }"
}
free_ports() {
  python3 -c '
import socket
socks = [socket.socket() for _ in range(2)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in socks])'
}

if [[ "$SKIP_BUILD" != 1 ]]; then
  log "building release binaries"
  (cd "$ROOT" && cargo build --release -p tollgate -p tollgate-bench)
fi
for bin in "$BIN_DIR/mock-upstream" "$BIN_DIR/loadgen" "$TOLLGATE_BIN"; do
  [[ -x "$bin" ]] || die "$bin not built"
done

# ---- mock upstream ---------------------------------------------------------
"$BIN_DIR/mock-upstream" --addr 127.0.0.1:0 --workers "$MOCK_WORKERS" >"$TMP/mock.out" 2>"$TMP/mock.err" &
MOCK_PID=$!
CHILDREN+=("$MOCK_PID")
MOCK_ADDR=""
deadline=$((SECONDS + 10))
while [[ -z "$MOCK_ADDR" ]]; do
  alive "$MOCK_PID" || { cat "$TMP/mock.err" >&2; die "mock-upstream exited"; }
  ((SECONDS < deadline)) || die "mock-upstream did not report its address in 10 s"
  read -r word addr <"$TMP/mock.out" 2>/dev/null || true
  if [[ "${word:-}" == listening ]]; then MOCK_ADDR="$addr"; else sleep 0.05; fi
done
log "mock upstream on $MOCK_ADDR"

# ---- two tollgates: budgets off and on ---------------------------------------
database_url() {
  local name="$1"
  if [[ "$DB" == sqlite ]]; then
    mkdir -p "$TMP/db-$name"
    echo "sqlite://$TMP/db-$name/bench.db"
  else
    local db="tg_budget_bench_${name}_$$"
    psql -q "$BENCH_PG_URL" -c "CREATE DATABASE $db" >/dev/null || die "cannot create database $db"
    python3 -c 'import sys; u=sys.argv[1]; b,q=(u.split("?",1)+[None])[:2]; s=b.find("://")+3; i=b.find("/",s); p=b if i<0 else b[:i]; print(p+"/"+sys.argv[2]+("?"+q if q else ""))' "$BENCH_PG_URL" "$db"
  fi
}

# start_tollgate NAME EXTRA_TOML: sets TG_PID_<NAME> and TG_URL_<NAME>.
start_tollgate() {
  local name="$1" extra="$2" url cfg http grpc pid
  url="$(database_url "$name")"
  cfg="$TMP/tollgate-$name.toml"
  read -r http grpc < <(free_ports)
  cat >"$cfg" <<EOF
[server]
http_addr = "127.0.0.1:$http"
grpc_addr = "127.0.0.1:$grpc"
[log]
level = "warn"
[database]
url = "$url"
[[auth.static_keys]]
user = "bench"
key = "tg-bench-key"
[providers.up]
kind = "openai"
base_url = "http://$MOCK_ADDR/v1"
keys = ["sk-bench"]
[pricing."up/gpt-bench"]
input_usd_per_mtok = 0.15
output_usd_per_mtok = 0.60
[service_types.default]
models = ["*"]
$extra
EOF
  "$TOLLGATE_BIN" serve --config "$cfg" >"$TMP/tollgate-$name.log" 2>&1 &
  pid=$!
  CHILDREN+=("$pid")
  local deadline=$((SECONDS + 60))
  until [[ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 1 "http://127.0.0.1:$http/readyz" || true)" == 200 ]]; do
    alive "$pid" || { tail -n 20 "$TMP/tollgate-$name.log" >&2; die "tollgate ($name) exited"; }
    ((SECONDS < deadline)) || die "tollgate ($name) not ready in 60 s"
    sleep 0.1
  done
  printf -v "TG_PID_$name" '%s' "$pid"
  printf -v "TG_URL_$name" '%s' "http://127.0.0.1:$http"
  log "tollgate ($name) on http://127.0.0.1:$http, $DB"
}

if [[ "$DB" == postgres ]]; then
  # Create the databases here, not in a subshell, so that cleanup drops them.
  URL_off="$(database_url off)"; PG_DBS+=("tg_budget_bench_off_$$")
  URL_on="$(database_url on)"; PG_DBS+=("tg_budget_bench_on_$$")
  database_url() { local v="URL_$1"; echo "${!v}"; }
fi
start_tollgate off ""
# A budget far above what the run spends: every request reserves and settles, none is refused.
start_tollgate on "[service_types.default.budget]
limit_usd = 1000000.0
period = \"monthly\"
$ON_EXTRA"

BODY='{"model":"up/gpt-bench","messages":[{"role":"user","content":"hello"}],"max_tokens":64}'
printf '%s' "$BODY" >"$TMP/via.json"
printf '%s' "${BODY/up\/gpt-bench/gpt-bench}" >"$TMP/direct.json"

for name in off on; do
  url="TG_URL_$name"
  code="$(curl -s -o "$TMP/probe.out" -D "$TMP/probe.h" -w '%{http_code}' --max-time 10 \
    -H 'Authorization: Bearer tg-bench-key' -H 'Content-Type: application/json' \
    --data-binary "@$TMP/via.json" "${!url}/v1/chat/completions" || true)"
  [[ "$code" == 200 ]] || { cat "$TMP/probe.out" >&2; die "probe via tollgate ($name) answered $code"; }
  if [[ "$name" == on ]]; then
    grep -qi '^x-budget-remaining-usd' "$TMP/probe.h" || die "budgets-on tollgate sent no budget headers"
  fi
done

# run TARGET SECS RATE: one loadgen run; prints its JSON line with cpu_ticks of the server.
run() {
  local target="$1" secs="$2" rate="$3" pid url body line before after
  case "$target" in
    direct) pid="$MOCK_PID"; url="http://$MOCK_ADDR/v1/chat/completions"; body="$TMP/direct.json" ;;
    off) pid="$TG_PID_off"; url="$TG_URL_off/v1/chat/completions"; body="$TMP/via.json" ;;
    on) pid="$TG_PID_on"; url="$TG_URL_on/v1/chat/completions"; body="$TMP/via.json" ;;
  esac
  before="$(cpu_ticks "$pid")"
  line="$(timeout --kill-after=5 "$((secs + 30))" "$BIN_DIR/loadgen" --url "$url" \
    --header 'Authorization: Bearer tg-bench-key' --body-file "$body" \
    --rate "$rate" --duration-secs "$secs" --connections "$CONNECTIONS" --workers "$LOADGEN_WORKERS" | head -n 1)"
  after="$(cpu_ticks "$pid")"
  [[ "$line" == \{* ]] || die "loadgen printed no result against $target"
  printf '%s,"target":"%s","cpu_ticks":%s}\n' "${line%\}}" "$target" "$((after - before))"
}

mkdir -p "$RESULTS_DIR"
RAW="$RESULTS_DIR/budget.jsonl"
: >"$RAW"
printf '{"phase":"meta","date":"%s","git":"%s","db":"%s","rate":%s,"rounds":%s,"round_secs":%s,"connections":%s,"clk_tck":%s,"cores":%s,"on_extra":%s}\n' \
  "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo none)" \
  "$DB" "$RATE" "$ROUNDS" "$ROUND_SECS" "$CONNECTIONS" "$(getconf CLK_TCK)" "$(nproc)" \
  "$(python3 -c 'import json, sys; print(json.dumps(sys.argv[1]))' "$ON_EXTRA")" >>"$RAW"

log "warm-up"
for t in direct off on; do run "$t" 1 100 >/dev/null; done
for ((round = 1; round <= ROUNDS; round++)); do
  for t in direct off on; do
    log "round $round/$ROUNDS at $RATE RPS: $t"
    line="$(run "$t" "$ROUND_SECS" "$RATE")"
    printf '{"phase":"round","round":%s,%s\n' "$round" "${line#\{}" >>"$RAW"
  done
done

python3 - "$RAW" <<'EOF' | tee "$RESULTS_DIR/budget.txt"
import json, statistics, sys
recs = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
meta = next(r for r in recs if r["phase"] == "meta")
rounds = [r for r in recs if r["phase"] == "round"]
def med(target, key):
    vals = [r[key] for r in rounds if r["target"] == target]
    return statistics.median(vals) if vals else None
def cpu(target):
    vals = []
    for r in rounds:
        if r["target"] == target:
            done = r["ok"] + r["non_2xx"]
            if done:
                vals.append(r["cpu_ticks"] * 1e6 / meta["clk_tck"] / done)
    return statistics.median(vals) if vals else None
errs = {t: sum(r.get("errors", 0) + r.get("non_2xx", 0) for r in rounds if r["target"] == t) for t in ("direct", "off", "on")}
print(f"budget check cost  {meta['date']}  git {meta['git']}  {meta['cores']} cores  db {meta['db']}  "
      f"{meta['rate']} RPS  {meta['rounds']} rounds x {meta['round_secs']} s  {meta['connections']} connections"
      + (f"  on-config: {meta['on_extra']!r}" if meta.get("on_extra") else ""))
print(f"{'':24}{'p50 us':>10}{'p90 us':>10}{'p99 us':>10}{'CPU us/req':>12}{'errors':>8}")
for t, label in (("direct", "direct to mock"), ("off", "tollgate, budgets off"), ("on", "tollgate, budgets on")):
    c = cpu(t)
    print(f"{label:24}{med(t,'p50_us'):>10.0f}{med(t,'p90_us'):>10.0f}{med(t,'p99_us'):>10.0f}"
          f"{(c if c is not None else float('nan')):>12.0f}{errs[t]:>8}")
for p in ("p50_us", "p99_us"):
    on, off, d = med("on", p), med("off", p), med("direct", p)
    print(f"{p[:3]}: budget check adds {on - off:+.0f} us (on/off = {on / off:.2f}x); "
          f"tollgate adds {off - d:+.0f} us without budgets, {on - d:+.0f} us with them")
co, cf = cpu("on"), cpu("off")
if co and cf:
    print(f"CPU per request: {cf:.0f} us off, {co:.0f} us on ({co / cf:.2f}x)")
EOF
log "results in bench/results/budget.txt (raw: bench/results/budget.jsonl)"
