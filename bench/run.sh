#!/usr/bin/env bash
# Tollgate speed benchmark (bench/README.md): added latency, throughput
# frontier, CPU per request, RSS and streaming overhead of tollgate ("min" and
# "full" policy profiles) and of a bare byte-forwarding proxy, each against
# talking to the mock upstream directly, every figure also as a ratio to the
# bare proxy's from the same run. See bench/README.md.
#
#   bash bench/run.sh                 # full run, about 10 minutes
#   QUICK=1 bash bench/run.sh         # smoke run, about a minute
#   DB=postgres bash bench/run.sh     # tollgate on PostgreSQL (BENCH_PG_URL)
#
# Talks only to 127.0.0.1; every phase is bounded in time; all children are
# stopped on exit.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# ---- knobs ---------------------------------------------------------------
QUICK="${QUICK:-0}"
if [[ "$QUICK" == 1 ]]; then
  : "${ROUNDS:=1}" "${ROUND_SECS:=2}" "${RATES:=500}"
  : "${FRONTIER_RATES:=500}" "${STREAM_RATE:=50}" "${MOCK_CHECK_SECS:=2}"
fi
ROUNDS="${ROUNDS:-5}"                 # interleaved A/B rounds per rate
ROUND_SECS="${ROUND_SECS:-5}"         # seconds of load per round
RATES="${RATES:-1000 5000}"           # A/B rates, requests/s
FRONTIER_RATES="${FRONTIER_RATES:-1000 2000 5000 10000 15000 20000 25000 30000}"
FRONTIER_SECS="${FRONTIER_SECS:-$ROUND_SECS}"
FRONTIER_P99_US="${FRONTIER_P99_US:-10000}"
STREAM_RATE="${STREAM_RATE:-100}"     # new streams per second
STREAM_CHUNKS="${STREAM_CHUNKS:-20}"
STREAM_INTERVAL_MS="${STREAM_INTERVAL_MS:-20}"
MOCK_CHECK_SECS="${MOCK_CHECK_SECS:-3}"
CONNECTIONS="${CONNECTIONS:-64}"      # keep-alive connections of the load generator
GRPC="${GRPC:-1}"                     # 1: the gRPC phase (grpc-bare and tollgate's gRPC API); 0: skip
GRPC_RATES="${GRPC_RATES:-$RATES}"    # gRPC A/B rates, requests/s
GRPC_CONNECTIONS="${GRPC_CONNECTIONS:-8}"  # HTTP/2 connections of grpc-loadgen (CONNECTIONS requests in flight)
MOCK_WORKERS="${MOCK_WORKERS:-1}"
LOADGEN_WORKERS="${LOADGEN_WORKERS:-1}"
READY_TIMEOUT_SECS="${READY_TIMEOUT_SECS:-60}"
SKIP_BUILD="${SKIP_BUILD:-0}"         # 1: use binaries already built
DIRECT_ONLY="${DIRECT_ONLY:-0}"       # 1: no tollgate, measure the mock path only
BIN_DIR="${BIN_DIR:-$ROOT/target/release}"
TOLLGATE_BIN="${TOLLGATE_BIN:-$BIN_DIR/tollgate}"
EXTRA_CONFIG="${EXTRA_CONFIG:-}"      # TOML text appended to every generated config
PROFILES="${PROFILES:-min full}"      # tollgate configurations: min, full, redis (see README)
BENCH_REDIS_URL="${BENCH_REDIS_URL:-redis://127.0.0.1:6379}"  # the "redis" profile's Redis
DB="${DB:-sqlite}"                    # sqlite | postgres
BENCH_PG_URL="${BENCH_PG_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
# Pinning: the servers under test on one core, the mock and the load generator
# on the other, so that they do not take each other's CPU (needs 2+ cores).
PIN="${PIN:-auto}"                    # auto (pin when there are 2+ cores) | 1 | 0
# 1: tollgate built with --features alloc-count, and allocations per request reported (the
# counting costs two atomic adds an allocation: compare latency only between ALLOCS=0 runs).
ALLOCS="${ALLOCS:-0}"
RESULTS_DIR="$ROOT/bench/results"

for tool in python3 curl timeout; do
  command -v "$tool" >/dev/null || { echo "run.sh: needs $tool" >&2; exit 2; }
done
[[ "$DB" == sqlite || "$DB" == postgres ]] || { echo "run.sh: DB is sqlite or postgres" >&2; exit 2; }
[[ "$DB" == sqlite ]] || command -v psql >/dev/null || { echo "run.sh: DB=postgres needs psql" >&2; exit 2; }
if [[ "$PIN" == auto ]]; then
  if (($(nproc) >= 2)) && command -v taskset >/dev/null; then PIN=1; else PIN=0; fi
fi
# Command prefixes; taskset execs the program, so $! stays the program's pid.
ON_SUT=()
ON_LOAD=()
if [[ "$PIN" == 1 ]]; then
  ON_SUT=(taskset -c 1)
  ON_LOAD=(taskset -c 0)
fi

log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "FAILED: $*"; exit 1; }

# ---- children and cleanup ------------------------------------------------
TMP="$(mktemp -d /tmp/tollgate-bench.XXXXXX)"
CHILDREN=()
PG_DBS=()
stop_pid() {
  local pid="$1" i
  kill "$pid" 2>/dev/null || return 0
  # Give it 5 s to exit cleanly, then insist.
  for ((i = 0; i < 50; i++)); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  kill -9 "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}
cleanup() {
  local rc=$? pid
  trap - EXIT INT TERM
  for pid in "${CHILDREN[@]}"; do stop_pid "$pid"; done
  for db in "${PG_DBS[@]}"; do
    psql -q "$BENCH_PG_URL" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1 || true
  done
  mkdir -p "$RESULTS_DIR"
  for f in "$TMP"/tollgate-*.log; do
    [[ -f "$f" ]] && cp "$f" "$RESULTS_DIR/"
  done
  rm -rf "$TMP"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---- helpers -------------------------------------------------------------
# "allocations bytes" so far of the tollgate at URL (alloc-count builds).
allocs_of() {
  curl -s --max-time 5 "$1/metrics" |
    awk '/^tollgate_allocations_total /{a=$2} /^tollgate_allocated_bytes_total /{b=$2} END{printf "%d %d\n", a, b}'
}
# Numeric field of a flat JSON line from loadgen.
field() {
  local re="\"$2\":(-?[0-9.]+)"
  if [[ "$1" =~ $re ]]; then printf '%s\n' "${BASH_REMATCH[1]}"; else printf '0\n'; fi
}
# utime+stime of a process, in clock ticks.
cpu_ticks() {
  local stat
  stat="$(cat "/proc/$1/stat" 2>/dev/null)" || { echo 0; return; }
  # Fields after "pid (comm) ": state is 1st, utime 12th, stime 13th.
  awk '{print $12 + $13}' <<<"${stat##*) }"
}
rss_kb() {
  awk '/^VmRSS:/ {print $2; found=1} END {if (!found) print 0}' "/proc/$1/status" 2>/dev/null || echo 0
}
alive() { kill -0 "$1" 2>/dev/null; }
# A load run passes: no errors or non-2xx answers and p99 under the limit.
step_ok() {
  (($(field "$1" errors) + $(field "$1" non_2xx) == 0 && $(field "$1" p99_us) < FRONTIER_P99_US))
}
# Every server under test is still running.
check_servers() {
  local t pid
  for t in "${TARGETS[@]}" ${PID_OF[grpc-bare]:+grpc-bare}; do
    [[ "$t" == direct ]] && continue
    pid="${PID_OF[$t]}"
    alive "$pid" || { tail -n 30 "$TMP/$t.log" >&2 2>/dev/null; die "$t exited"; }
  done
}
# Append loadgen's line to the raw results, tagged: record PHASE TARGET ROUND JSON.
record() {
  printf '{"phase":"%s","target":"%s","round":%s,%s\n' "$1" "$2" "$3" "${4#\{}" >>"$RAW"
}

# loadgen SECS ARGS...: one run, killed if it overstays its own bound.
loadgen() {
  local secs="$1"
  shift
  "${ON_LOAD[@]}" timeout --kill-after=5 "$(( ${secs%.*} + 30 ))" \
    "$BIN_DIR/loadgen" --duration-secs "$secs" --connections "$CONNECTIONS" \
    --workers "$LOADGEN_WORKERS" --gap-limit-ms "$((10 * STREAM_INTERVAL_MS))" "$@"
}
# grpc_loadgen SECS ARGS...: the same for gRPC; CONNECTIONS requests in flight at most, as
# with loadgen, over GRPC_CONNECTIONS HTTP/2 connections.
grpc_loadgen() {
  local secs="$1"
  shift
  "${ON_LOAD[@]}" timeout --kill-after=5 "$(( ${secs%.*} + 30 ))" \
    "$BIN_DIR/grpc-loadgen" --duration-secs "$secs" --connections "$GRPC_CONNECTIONS" \
    --concurrency "$CONNECTIONS" --workers "$LOADGEN_WORKERS" \
    --gap-limit-ms "$((10 * STREAM_INTERVAL_MS))" "$@"
}

declare -A PID_OF=() URL_OF=() GRPC_URL_OF=()
HDR_ARGS=(--header "Authorization: Bearer tg-bench-key")
# run_target TARGET RATE SECS MODE: one loadgen run against a target (direct,
# bare, tg-min, tg-full); see measure.
run_target() {
  local target="$1" rate="$2" secs="$3" mode="$4" body
  local -a args
  args=(--url "${URL_OF[$target]}/v1/chat/completions")
  if [[ "$target" == tg-* ]]; then
    args+=("${HDR_ARGS[@]}")
    body="$TMP/via-$mode.json"
  else
    body="$TMP/direct-$mode.json"
  fi
  measure "$target" loadgen "$secs" "${args[@]}" --rate "$rate" --mode "$mode" --body-file "$body"
}
# run_grpc TARGET RATE SECS MODE: one grpc-loadgen run (MODE unary or stream) against
# grpc-bare or a tollgate's gRPC port; see measure.
run_grpc() {
  local target="$1" rate="$2" secs="$3" mode="$4"
  local -a args=(--url "${GRPC_URL_OF[$target]}" --model up/gpt-bench)
  [[ "$target" == tg-* ]] && args+=("${HDR_ARGS[@]}")
  measure "$target" grpc_loadgen "$secs" "${args[@]}" --rate "$rate" --mode "$mode"
}
# measure TARGET COMMAND...: runs one load generator command while sampling the
# CPU of TARGET's process and its peak RSS. Prints the generator's JSON line with
# cpu_ticks and rss_peak_kb (and, ALLOCS=1, a tollgate's allocations) added.
measure() {
  local target="$1" pid out
  shift
  pid="${PID_OF[$target]}"
  out="$TMP/out.json"
  local before after peak=0 r lg a0=0 b0=0 a1=0 b1=0 extra=""
  if [[ "$ALLOCS" == 1 && "$target" == tg-* ]]; then read -r a0 b0 < <(allocs_of "${URL_OF[$target]}"); fi
  before="$(cpu_ticks "$pid")"
  "$@" >"$out" &
  lg=$!
  while alive "$lg"; do
    r="$(rss_kb "$pid")"
    ((r > peak)) && peak="$r"
    sleep 0.2
  done
  wait "$lg" || die "$1 against $target exited with an error"
  after="$(cpu_ticks "$pid")"
  if [[ "$ALLOCS" == 1 && "$target" == tg-* ]]; then
    read -r a1 b1 < <(allocs_of "${URL_OF[$target]}")
    extra=",\"allocs\":$((a1 - a0)),\"alloc_bytes\":$((b1 - b0))"
  fi
  local line
  line="$(head -n 1 "$out")"
  [[ "$line" == \{* ]] || die "$1 printed no result against $target"
  printf '%s,"cpu_ticks":%s,"rss_peak_kb":%s%s}\n' "${line%\}}" "$((after - before))" "$peak" "$extra"
}

# ---- build ---------------------------------------------------------------
if [[ "$SKIP_BUILD" != 1 ]]; then
  log "building release binaries"
  if [[ "$DIRECT_ONLY" == 1 ]]; then
    (cd "$ROOT" && cargo build --release -p tollgate-bench)
  else
    features=()
    [[ "$ALLOCS" == 1 ]] && features=(--features tollgate/alloc-count)
    (cd "$ROOT" && cargo build --release -p tollgate -p tollgate-bench "${features[@]}")
  fi
fi
for bin in mock-upstream loadgen bare-proxy $([[ "$GRPC" == 1 ]] && echo grpc-loadgen grpc-bare); do
  [[ -x "$BIN_DIR/$bin" ]] || die "$BIN_DIR/$bin not built"
done
[[ "$DIRECT_ONLY" == 1 || -x "$TOLLGATE_BIN" ]] || die "$TOLLGATE_BIN not built"

mkdir -p "$RESULTS_DIR"
RAW="$RESULTS_DIR/latest.jsonl"
: >"$RAW"
CLK_TCK="$(getconf CLK_TCK)"
# Machine noise: the load before we start, and CPU time stolen by the host
# (a VM's vCPU descheduled) over the run; both make wall-clock figures noisy.
read -r LOADAVG_START _ </proc/loadavg
STAT_START="$(head -n 1 /proc/stat)"
GIT_REV="$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo none)"
printf '{"phase":"meta","date":"%s","git":"%s","cores":%s,"rounds":%s,"round_secs":%s,"frontier_secs":%s,"connections":%s,"clk_tck":%s,"frontier_p99_us":%s,"stream_rate":%s,"stream_chunks":%s,"stream_interval_ms":%s,"direct_only":%s,"quick":%s,"loadavg_start":%s,"pinned":%s,"db":"%s","cpu":"%s"}\n' \
  "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$GIT_REV" "$(nproc)" "$ROUNDS" "$ROUND_SECS" \
  "$FRONTIER_SECS" "$CONNECTIONS" "$CLK_TCK" "$FRONTIER_P99_US" "$STREAM_RATE" \
  "$STREAM_CHUNKS" "$STREAM_INTERVAL_MS" "$DIRECT_ONLY" "$QUICK" "$LOADAVG_START" \
  "$PIN" "$DB" "$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo | tr -d '"')" >>"$RAW"

# ---- mock upstream -------------------------------------------------------
: >"$TMP/mock.out"
"${ON_LOAD[@]}" "$BIN_DIR/mock-upstream" --addr 127.0.0.1:0 --workers "$MOCK_WORKERS" \
  --chunks "$STREAM_CHUNKS" --chunk-interval-ms "$STREAM_INTERVAL_MS" \
  >"$TMP/mock.out" 2>"$TMP/mock.err" &
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
log "mock upstream on $MOCK_ADDR (pid $MOCK_PID)"

MSG='"messages":[{"role":"user","content":"hello"}],"max_tokens":64'
printf '{"model":"gpt-bench",%s}' "$MSG" >"$TMP/direct-plain.json"
printf '{"model":"gpt-bench",%s,"stream":true}' "$MSG" >"$TMP/direct-stream.json"
printf '{"model":"up/gpt-bench",%s}' "$MSG" >"$TMP/via-plain.json"
printf '{"model":"up/gpt-bench",%s,"stream":true}' "$MSG" >"$TMP/via-stream.json"
PID_OF[direct]="$MOCK_PID"
URL_OF[direct]="http://$MOCK_ADDR"
TARGETS=(direct)

# The mock must not be the bottleneck: it has to hold 3x the highest A/B rate.
max_rate=0
for r in $RATES; do ((r > max_rate)) && max_rate="$r"; done
check_rate=$((3 * max_rate))
log "mock capacity check: $check_rate RPS for $MOCK_CHECK_SECS s"
line="$(run_target direct "$check_rate" "$MOCK_CHECK_SECS" plain)"
record mockcheck direct 0 "$line"
if step_ok "$line"; then
  log "mock sustains $check_rate RPS: p99 $(field "$line" p99_us) us, no errors"
else
  log "WARNING: mock does not sustain $check_rate RPS cleanly ($line); results near that rate measure the machine, not tollgate"
fi

# ---- servers under test -------------------------------------------------
# Free ports come from binding port 0 and letting go, so another process can
# take one before the server binds it; a bind failure is retried on fresh ports.
free_ports() {
  python3 -c '
import socket
socks = [socket.socket() for _ in range(2)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in socks])'
}

# wait_ready NAME PID URL: polls URL/readyz (or /, for the bare proxy) until 200.
wait_ready() {
  local name="$1" pid="$2" url="$3" deadline=$((SECONDS + READY_TIMEOUT_SECS))
  while alive "$pid" && ((SECONDS < deadline)); do
    if [[ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 1 "$url" || true)" == 200 ]]; then
      return 0
    fi
    sleep 0.1
  done
  return 1
}

# start_baseline TARGET BIN: starts a baseline server on the SUT core in front of
# the mock and waits for its "listening ADDR" line; sets PID_OF[TARGET] and ADDR.
start_baseline() {
  local target="$1" bin="$2" word addr deadline
  : >"$TMP/$target.out"
  "${ON_SUT[@]}" "$BIN_DIR/$bin" --addr 127.0.0.1:0 --upstream "$MOCK_ADDR" \
    >"$TMP/$target.out" 2>"$TMP/$target.log" &
  PID_OF[$target]=$!
  CHILDREN+=("${PID_OF[$target]}")
  ADDR=""
  deadline=$((SECONDS + 10))
  while [[ -z "$ADDR" ]]; do
    alive "${PID_OF[$target]}" || { cat "$TMP/$target.log" >&2; die "$bin exited"; }
    ((SECONDS < deadline)) || die "$bin did not report its address in 10 s"
    read -r word addr <"$TMP/$target.out" 2>/dev/null || true
    if [[ "${word:-}" == listening ]]; then ADDR="$addr"; else sleep 0.05; fi
  done
}

# The bare proxy: forwards bytes to the mock, parses nothing. Its gRPC twin
# (grpc-bare) parses the least a gRPC-to-OpenAI gateway must.
if [[ "$DIRECT_ONLY" != 1 ]]; then
  start_baseline bare bare-proxy
  URL_OF[bare]="http://$ADDR"
  TARGETS+=(bare)
  log "bare proxy on $ADDR (pid ${PID_OF[bare]})"
  if [[ "$GRPC" == 1 ]]; then
    start_baseline grpc-bare grpc-bare
    GRPC_URL_OF[grpc-bare]="http://$ADDR"
    log "bare gRPC gateway on $ADDR (pid ${PID_OF[grpc-bare]})"
  fi
fi

# database_url PROFILE: a fresh database for one tollgate.
database_url() {
  local name="$1"
  if [[ "$DB" == sqlite ]]; then
    mkdir -p "$TMP/db-$name"
    echo "sqlite://$TMP/db-$name/bench.db"
  else
    local db="tg_bench_${name}_$$"
    psql -q "$BENCH_PG_URL" -c "CREATE DATABASE $db" >/dev/null || die "cannot create database $db"
    python3 -c 'import sys; u=sys.argv[1]; b,q=(u.split("?",1)+[None])[:2]; s=b.find("://")+3; i=b.find("/",s); p=b if i<0 else b[:i]; print(p+"/"+sys.argv[2]+("?"+q if q else ""))' "$BENCH_PG_URL" "$db"
  fi
}

# profile_config PROFILE: the TOML that makes a profile. "min": key auth and the
# ledger. "full": also pricing, a dollar budget every request reserves and
# settles, and RPM/TPM limits every request is counted against (all far above
# what the run uses, so none refuses). "redis": "full" with its RPM/TPM windows in
# Redis (BENCH_REDIS_URL; fail_closed, so a failing Redis shows as errors, not as
# requests admitted unchecked); run it beside "full" to read the Redis check's cost.
profile_config() {
  case "$1" in
    min) ;;
    redis)
      profile_config full
      cat <<EOF
[rate_limits]
backend = "redis"
redis_url = "$BENCH_REDIS_URL"
key_prefix = "tollgate-bench-$$"
on_redis_error = "fail_closed"
EOF
      ;;
    full)
      cat <<EOF
[pricing."up/gpt-bench"]
input_usd_per_mtok = 0.15
output_usd_per_mtok = 0.60
[service_types.default.budget]
limit_usd = 1000000.0
period = "monthly"
[service_types.default.rate_limits]
rpm = 100000000
tpm = 100000000000
EOF
      # LEASE_FRACTION=0: every budgeted request reserves in the database (default: leases, 0.1).
      if [[ -n "${LEASE_FRACTION:-}" ]]; then
        printf '[budgets]\nlease_fraction = %s\n' "$LEASE_FRACTION"
      fi
      ;;
    *) die "unknown profile $1 (min, full or redis)" ;;
  esac
}

# start_tollgate PROFILE
start_tollgate() {
  local profile="$1" name="tg-$1" url cfg http grpc pid attempt
  url="$(database_url "$profile")"
  [[ "$DB" == postgres ]] && PG_DBS+=("tg_bench_${profile}_$$")
  cfg="$TMP/$name.toml"
  for attempt in 1 2 3; do
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
[service_types.default]
models = ["*"]
$(profile_config "$profile")
EOF
    if [[ -n "$EXTRA_CONFIG" ]]; then printf '%s\n' "$EXTRA_CONFIG" >>"$cfg"; fi
    "${ON_SUT[@]}" "$TOLLGATE_BIN" serve --config "$cfg" >"$TMP/$name.log" 2>&1 &
    pid=$!
    CHILDREN+=("$pid")
    if wait_ready "$name" "$pid" "http://127.0.0.1:$http/readyz"; then
      PID_OF[$name]="$pid"
      URL_OF[$name]="http://127.0.0.1:$http"
      GRPC_URL_OF[$name]="http://127.0.0.1:$grpc"
      TARGETS+=("$name")
      log "tollgate ($profile, $DB) on http://127.0.0.1:$http (pid $pid)"
      return 0
    fi
    if ! alive "$pid" && ((attempt < 3)) && grep -qiE 'in ?use' "$TMP/$name.log"; then
      log "tollgate could not bind port $http or $grpc; retrying on others"
      continue
    fi
    tail -n 30 "$TMP/$name.log" >&2
    die "tollgate ($profile) not ready (exited, or no 200 from /readyz within $READY_TIMEOUT_SECS s)"
  done
}

if [[ "$DIRECT_ONLY" != 1 ]]; then
  for profile in $PROFILES; do start_tollgate "$profile"; done
  # One request by hand first: a bench of 401s or 429s would measure nothing.
  for t in "${TARGETS[@]}"; do
    [[ "$t" == direct ]] && continue
    for mode in plain stream; do
      body="$TMP/direct-$mode.json"
      [[ "$t" == tg-* ]] && body="$TMP/via-$mode.json"
      code="$(curl -s -o "$TMP/probe.out" -D "$TMP/probe.h" -w '%{http_code}' --max-time 10 \
        -H 'Authorization: Bearer tg-bench-key' -H 'Content-Type: application/json' \
        --data-binary "@$body" "${URL_OF[$t]}/v1/chat/completions" || true)"
      [[ "$code" == 200 ]] || { head -c 500 "$TMP/probe.out" >&2; echo >&2; die "probe ($mode) via $t answered $code"; }
      if [[ ( "$t" == tg-full || "$t" == tg-redis ) && "$mode" == plain ]]; then
        grep -qi '^x-budget-remaining-usd' "$TMP/probe.h" || die "$t sent no budget headers: its budget is not on"
        grep -qi '^x-ratelimit-remaining-requests' "$TMP/probe.h" || die "$t sent no rate-limit headers: its limits are not on"
      fi
    done
    [[ "$t" == tg-* ]] && printf '{"phase":"rss","target":"%s","at":"idle","kb":%s}\n' "$t" "$(rss_kb "${PID_OF[$t]}")" >>"$RAW"
  done
fi

# Warm-up, unrecorded: opens connections and pools on both paths.
for t in "${TARGETS[@]}"; do line="$(run_target "$t" 200 1 plain)"; done
check_servers

# ---- interleaved A/B rounds ----------------------------------------------
for rate in $RATES; do
  for ((round = 1; round <= ROUNDS; round++)); do
    for t in "${TARGETS[@]}"; do
      log "A/B $rate RPS round $round/$ROUNDS: $t"
      line="$(run_target "$t" "$rate" "$ROUND_SECS" plain)"
      record ab "$t" "$round" "$line"
      check_servers
    done
  done
done

# ---- throughput frontier -------------------------------------------------
# Step the rate up until each target misses p99 < FRONTIER_P99_US or errs. A
# failed step is tried once more, so one stall of a shared machine does not
# end the search; the report takes the better attempt.
declare -A FAILED=()
for rate in $FRONTIER_RATES; do
  for t in "${TARGETS[@]}"; do
    [[ -n "${FAILED[$t]:-}" ]] && continue
    for attempt in 1 2; do
      log "frontier $rate RPS: $t (attempt $attempt)"
      line="$(run_target "$t" "$rate" "$FRONTIER_SECS" plain)"
      record frontier "$t" "$attempt" "$line"
      check_servers
      step_ok "$line" && break
      ((attempt == 2)) && FAILED[$t]=1
    done
  done
  ((${#FAILED[@]} == ${#TARGETS[@]})) && break
done

# ---- gRPC ----------------------------------------------------------------
# tollgate's gRPC API against grpc-bare, the least a gRPC-to-OpenAI gateway
# does, measured like the HTTP A/B: interleaved unary (Complete) rounds at each
# of GRPC_RATES, then StreamComplete rounds at STREAM_RATE.
if [[ "$GRPC" == 1 && "$DIRECT_ONLY" != 1 ]]; then
  GRPC_TARGETS=(grpc-bare)
  for t in "${TARGETS[@]}"; do [[ "$t" == tg-* ]] && GRPC_TARGETS+=("$t"); done
  # One call of each RPC first: a bench of refusals would measure nothing.
  for t in "${GRPC_TARGETS[@]}"; do
    for mode in unary stream; do
      line="$(run_grpc "$t" 1 0.001 "$mode" 2>"$TMP/grpc-probe.err")" || true
      [[ "$(field "$line" ok)" == 1 ]] || { cat "$TMP/grpc-probe.err" >&2; die "gRPC probe ($mode) via $t failed: $line"; }
    done
  done
  # Warm-up, unrecorded: opens the HTTP/2 connections and upstream pools.
  for t in "${GRPC_TARGETS[@]}"; do line="$(run_grpc "$t" 200 1 unary)"; done
  check_servers
  for rate in $GRPC_RATES; do
    for ((round = 1; round <= ROUNDS; round++)); do
      for t in "${GRPC_TARGETS[@]}"; do
        log "gRPC A/B $rate RPS round $round/$ROUNDS: $t"
        line="$(run_grpc "$t" "$rate" "$ROUND_SECS" unary)"
        record grpc-ab "$t" "$round" "$line"
        check_servers
      done
    done
  done
  for ((round = 1; round <= ROUNDS; round++)); do
    for t in "${GRPC_TARGETS[@]}"; do
      log "gRPC streaming round $round/$ROUNDS ($STREAM_RATE streams/s): $t"
      line="$(run_grpc "$t" "$STREAM_RATE" "$ROUND_SECS" stream)"
      record grpc-stream "$t" "$round" "$line"
      check_servers
    done
  done
fi

# ---- streaming -----------------------------------------------------------
for ((round = 1; round <= ROUNDS; round++)); do
  for t in "${TARGETS[@]}"; do
    log "streaming round $round/$ROUNDS ($STREAM_RATE streams/s): $t"
    line="$(run_target "$t" "$STREAM_RATE" "$ROUND_SECS" stream)"
    record stream "$t" "$round" "$line"
    check_servers
  done
done

if [[ "$DIRECT_ONLY" != 1 ]]; then
  # Settling time before the after-load RSS reading; not a readiness wait.
  sleep 2
  for t in "${TARGETS[@]}"; do
    [[ "$t" == tg-* ]] && printf '{"phase":"rss","target":"%s","at":"after","kb":%s}\n' "$t" "$(rss_kb "${PID_OF[$t]}")" >>"$RAW"
  done
fi

python3 - "$STAT_START" "$(head -n 1 /proc/stat)" >>"$RAW" <<'EOF'
import json, sys
a, b = ([int(x) for x in line.split()[1:9]] for line in sys.argv[1:3])
d = [y - x for x, y in zip(a, b)]
total = sum(d) or 1
# /proc/stat cpu: user nice system idle iowait irq softirq steal
print(json.dumps({"phase": "machine", "steal_pct": round(100 * d[7] / total, 1),
                  "busy_pct": round(100 * (total - d[3] - d[4]) / total, 1)}))
EOF

python3 "$ROOT/bench/report.py" "$RAW" | tee "$RESULTS_DIR/latest.txt"
log "results in bench/results/latest.txt (raw: bench/results/latest.jsonl)"
