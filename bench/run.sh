#!/usr/bin/env bash
# Tollgate speed benchmark (bench/README.md): added latency, throughput
# frontier, CPU per request, RSS and streaming overhead of tollgate ("min" and
# "full" policy profiles) and of a bare byte-forwarding proxy, each against
# talking to the mock upstream directly, every figure also as a ratio to the
# bare proxy's from the same run. See bench/README.md.
#
#   bash bench/run.sh                 # full run, about 16 minutes (GRPC=0: 12)
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
  : "${STREAM_CONCURRENCY:=100}" "${IDLE_STREAMS:=100}" "${IDLE_HOLD_SECS:=1}" "${POOL_IDLE_SECS:=2}"
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
STREAM_CONCURRENCY="${STREAM_CONCURRENCY:-500}"  # streams open at once in the concurrency phase; 0: skip
IDLE_STREAMS="${IDLE_STREAMS:-500}"   # idle streams held open for RSS per stream; 0: skip
IDLE_HOLD_SECS="${IDLE_HOLD_SECS:-3}" # how long they are held (under tollgate's 30 s idle timeout)
MOCK_CHECK_SECS="${MOCK_CHECK_SECS:-3}"
# Idle timeout of tollgate's upstream and database pools (pool_idle_timeout_secs,
# idle_connection_timeout_secs; defaults 90 and 60 s), so the last RSS reading comes after they let go.
POOL_IDLE_SECS="${POOL_IDLE_SECS:-10}"
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
LOG_TAG=bench
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"

# ---- helpers -------------------------------------------------------------
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

declare -A PID_OF=() URL_OF=()
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
start_listener mock "${ON_LOAD[@]}" "$BIN_DIR/mock-upstream" --addr 127.0.0.1:0 \
  --workers "$MOCK_WORKERS" --chunks "$STREAM_CHUNKS" --chunk-interval-ms "$STREAM_INTERVAL_MS"
MOCK_PID="$LISTEN_PID"
MOCK_ADDR="$LISTEN_ADDR"
log "mock upstream on $MOCK_ADDR (pid $MOCK_PID)"
# The idle-stream phase's upstream: the first chunk at once, the next an hour later.
IDLE_ADDR=""
if [[ "$DIRECT_ONLY" != 1 ]] && ((IDLE_STREAMS > 0)); then
  start_listener idle-mock "${ON_LOAD[@]}" "$BIN_DIR/mock-upstream" --addr 127.0.0.1:0 \
    --workers "$MOCK_WORKERS" --chunks 2 --chunk-interval-ms 3600000
  IDLE_MOCK_PID="$LISTEN_PID"
  IDLE_ADDR="$LISTEN_ADDR"
  log "idle mock upstream on $IDLE_ADDR (pid $IDLE_MOCK_PID)"
fi

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
# The bare proxy: forwards bytes to the mock, parses nothing. Its gRPC twin
# (grpc-bare) parses the least a gRPC-to-OpenAI gateway must.
if [[ "$DIRECT_ONLY" != 1 ]]; then
  start_baseline bare bare-proxy "$MOCK_ADDR"
  URL_OF[bare]="http://$LISTEN_ADDR"
  TARGETS+=(bare)
  log "bare proxy on $LISTEN_ADDR (pid ${PID_OF[bare]})"
  if [[ "$GRPC" == 1 ]]; then
    start_baseline grpc-bare grpc-bare "$MOCK_ADDR"
    GRPC_URL_OF[grpc-bare]="http://$LISTEN_ADDR"
    log "bare gRPC gateway on $LISTEN_ADDR (pid ${PID_OF[grpc-bare]})"
  fi
fi

if [[ "$DIRECT_ONLY" != 1 ]]; then
  for profile in $PROFILES; do
    start_tollgate "$profile"
    TARGETS+=("tg-$profile")
  done
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
# end the search; the report takes the better attempt. Each attempt records
# the share of the CPU the host stole during it (a VM's vCPU descheduled): a
# step that failed while the host stole FRONTIER_STEAL_PCT or more is tried up
# to FRONTIER_STOLEN_TRIES times in all, since it measured the host.
FRONTIER_STEAL_PCT="${FRONTIER_STEAL_PCT:-1}"
FRONTIER_STOLEN_TRIES="${FRONTIER_STOLEN_TRIES:-4}"
declare -A FAILED=()
for rate in $FRONTIER_RATES; do
  for t in "${TARGETS[@]}"; do
    [[ -n "${FAILED[$t]:-}" ]] && continue
    for ((attempt = 1; attempt <= FRONTIER_STOLEN_TRIES; attempt++)); do
      log "frontier $rate RPS: $t (attempt $attempt)"
      before="$(host_ticks)"
      line="$(run_target "$t" "$rate" "$FRONTIER_SECS" plain)"
      stolen="$(steal_pct "$before" "$(host_ticks)")"
      record frontier "$t" "$attempt" "{\"steal_pct\":$stolen,${line#\{}"
      check_servers
      step_ok "$line" && break
      if awk -v s="$stolen" -v l="$FRONTIER_STEAL_PCT" 'BEGIN {exit !(s >= l)}'; then
        log "frontier $rate RPS: $t failed while the host stole $stolen% of the CPU"
        ((attempt < FRONTIER_STOLEN_TRIES)) && continue
      fi
      if ((attempt >= 2 || attempt == FRONTIER_STOLEN_TRIES)); then
        FAILED[$t]=1
        break
      fi
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

# ---- concurrent streams --------------------------------------------------
# STREAM_CONCURRENCY 20 ms-paced streams open at once: a stream lasts about (chunks - 1) x
# pacing, so new ones arrive at concurrency / that, and loadgen reports how many were in flight
# (mean and most). The connections are 1.5x the concurrency because a slow target keeps each
# stream open longer. The mock's and the load generator's own CPU are recorded beside, to show
# whether they (on core 0, together) were the limit.
if ((STREAM_CONCURRENCY > 0)); then
  stream_ms=$(((STREAM_CHUNKS > 1 ? STREAM_CHUNKS - 1 : 1) * STREAM_INTERVAL_MS))
  conc_rate="$(awk -v c="$STREAM_CONCURRENCY" -v ms="$stream_ms" 'BEGIN {printf "%.1f", c * 1000 / ms}')"
  for ((round = 1; round <= ROUNDS; round++)); do
    for t in "${TARGETS[@]}"; do
      log "concurrent streams round $round/$ROUNDS ($STREAM_CONCURRENCY open, $conc_rate new/s): $t"
      m0="$(cpu_ticks "$MOCK_PID")"
      line="$(CONNECTIONS=$((STREAM_CONCURRENCY * 3 / 2)) run_target "$t" "$conc_rate" "$ROUND_SECS" stream)"
      m1="$(cpu_ticks "$MOCK_PID")"
      record conc "$t" "$round" "${line%\}},\"concurrency\":$STREAM_CONCURRENCY,\"mock_cpu_ticks\":$((m1 - m0))}"
      check_servers
    done
  done
fi

if [[ "$DIRECT_ONLY" != 1 ]]; then
  # Settling time before the after-load RSS reading; not a readiness wait.
  sleep 2
  for t in "${TARGETS[@]}"; do
    [[ "$t" == tg-* ]] && printf '{"phase":"rss","target":"%s","at":"after","kb":%s}\n' "$t" "$(rss_kb "${PID_OF[$t]}")" >>"$RAW"
  done
  # Once the upstream and database pools closed the connections the load left idle (they
  # check once per POOL_IDLE_SECS, so within two of them); a settling time, not a readiness wait.
  log "waiting $((2 * POOL_IDLE_SECS + 2)) s for the pools to close idle connections"
  sleep "$((2 * POOL_IDLE_SECS + 2))"
  for t in "${TARGETS[@]}"; do
    [[ "$t" == tg-* ]] && printf '{"phase":"rss","target":"%s","at":"pools_idle","kb":%s}\n' "$t" "$(rss_kb "${PID_OF[$t]}")" >>"$RAW"
  done
fi

# ---- idle streams --------------------------------------------------------
# What an open stream that sends nothing costs in memory. Each kind of server runs afresh for
# this (a process that has served the phases above keeps freed heap to reuse, which would hide
# the cost): it takes 10 streams to warm up, then IDLE_STREAMS streams from the idle mock are
# opened (500/s), each waits for its first chunk, and the server's RSS is read once all are open
# and during the IDLE_HOLD_SECS they are held; then all are closed at once, and the server must
# let go of them: its open descriptors back to where they were, and for tollgate no request in
# progress and a ledger row for every stream.

# hold_run NAME URL N HOLD BODY [HEADER]: one loadgen --mode hold run against server NAME (pid
# in PID_OF) while reading its RSS and descriptors. Prints the loadgen line with rss_open_kb,
# rss_held_kb (the most while held) and fd_open added.
hold_run() {
  local name="$1" url="$2" n="$3" hold="$4" body="$5" pid="${PID_OF[$1]}" out="$TMP/hold.out"
  local -a hdr=()
  [[ -n "${6:-}" ]] && hdr=(--header "$6")
  local lg deadline rss_open=0 fd_open=0 peak=0 r word
  # Emptied here, not by the redirection: the child truncates it only once it runs, and a line
  # left from the last run must not be taken for this one's.
  : >"$out"
  "${ON_LOAD[@]}" timeout --kill-after=5 "$((${hold%.*} + 60))" "$BIN_DIR/loadgen" --mode hold \
    --url "$url/v1/chat/completions" --connections "$n" --rate 500 --hold-secs "$hold" \
    --body-file "$body" "${hdr[@]}" >"$out" &
  lg=$!
  deadline=$((SECONDS + 30 + n / 100))
  while alive "$lg" && ((SECONDS < deadline)); do
    read -r word _ <"$out" 2>/dev/null || true
    [[ "${word:-}" == open ]] && break
    sleep 0.05
  done
  rss_open="$(rss_kb "$pid")"
  fd_open="$(fd_count "$pid")"
  while alive "$lg"; do
    r="$(rss_kb "$pid")"
    ((r > peak)) && peak="$r"
    sleep 0.2
  done
  wait "$lg" || die "loadgen --mode hold against $name exited with an error"
  local line
  line="$(sed -n 2p "$out")"
  [[ "$line" == \{* ]] || die "loadgen --mode hold printed no result against $name"
  ((peak > rss_open)) || peak="$rss_open"
  printf '%s,"rss_open_kb":%s,"rss_held_kb":%s,"fd_open":%s}\n' "${line%\}}" "$rss_open" "$peak" "$fd_open"
}

# in_progress URL: requests tollgate has in progress, over every endpoint but the scrape itself.
in_progress() {
  curl -s --max-time 5 "$1/metrics" |
    awk '/^tollgate_in_progress_requests[{ ]/ && !/metrics"/ {n += $NF} END {printf "%d\n", n}'
}

# idle_target LABEL NAME BODY [HEADER]: the idle-stream measurement of the fresh server NAME,
# recorded as target LABEL; stops the server after.
idle_target() {
  local label="$1" name="$2" body="$3" hdr="${4:-}" pid="${PID_OF[$2]}" url="${URL_OF[$2]}"
  local warm line rss0 fd0 fd1 deadline released=false inprog=-1 rows=-1 expect panics
  warm="$(hold_run "$name" "$url" 10 0 "$body" "$hdr")"
  rss0="$(rss_kb "$pid")"
  fd0="$(fd_count "$pid")"
  log "idle streams: $IDLE_STREAMS held ${IDLE_HOLD_SECS}s via $label (fresh pid $pid, RSS $((rss0 / 1024)) MiB)"
  line="$(hold_run "$name" "$url" "$IDLE_STREAMS" "$IDLE_HOLD_SECS" "$body" "$hdr")"
  # Closed streams are let go of within 10 s, or they are stuck.
  expect=$(($(field "$warm" opened) + $(field "$line" opened)))
  deadline=$((SECONDS + 10))
  while ((SECONDS < deadline)); do
    fd1="$(fd_count "$pid")"
    if [[ "$name" == tg-* ]]; then
      inprog="$(in_progress "$url")"
      rows="$(ledger_rows "$name" "requested_model = 'idle/gpt-bench' AND reason = 'client_disconnected'")"
      ((fd1 <= fd0 + 2 && inprog == 0 && rows >= expect)) && { released=true; break; }
    else
      ((fd1 <= fd0 + 2)) && { released=true; break; }
    fi
    sleep 0.2
  done
  panics="$(grep -ci panic "$TMP/$name.log" 2>/dev/null || true)"
  alive "$pid" || die "$label exited during the idle-stream phase"
  [[ "$released" == true ]] || log "WARNING: $label did not let go of the closed idle streams in 10 s (descriptors $fd0 -> $fd1, in progress $inprog, ledger rows $rows of $expect)"
  record idle "$label" 1 "${line%\}},\"rss_before_kb\":$rss0,\"fd_before\":$fd0,\"fd_after\":$fd1,\"released\":$released,\"in_progress_after\":$inprog,\"ledger_rows\":$rows,\"ledger_expected\":$expect,\"panics\":${panics:-0}}"
  stop_pid "$pid"
}

if [[ "$DIRECT_ONLY" != 1 ]] && ((IDLE_STREAMS > 0)); then
  printf '{"model":"gpt-bench",%s,"stream":true}' "$MSG" >"$TMP/idle-direct.json"
  printf '{"model":"idle/gpt-bench",%s,"stream":true}' "$MSG" >"$TMP/idle-via.json"
  start_baseline bare-idle bare-proxy "$IDLE_ADDR"
  URL_OF[bare-idle]="http://$LISTEN_ADDR"
  idle_target bare bare-idle "$TMP/idle-direct.json"
  for profile in $PROFILES; do
    start_tollgate "$profile" "tg-$profile-idle"
    idle_target "tg-$profile" "tg-$profile-idle" "$TMP/idle-via.json" "Authorization: Bearer tg-bench-key"
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
