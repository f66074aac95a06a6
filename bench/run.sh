#!/usr/bin/env bash
# Tollgate speed benchmark (DESIGN.md section 8): added latency, throughput
# frontier, CPU per request, RSS and streaming overhead, tollgate versus
# talking to the mock upstream directly. See bench/README.md.
#
#   bash bench/run.sh            # full run, about 5 minutes
#   QUICK=1 bash bench/run.sh    # smoke run, about 30 seconds
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
MOCK_WORKERS="${MOCK_WORKERS:-1}"
LOADGEN_WORKERS="${LOADGEN_WORKERS:-1}"
READY_TIMEOUT_SECS="${READY_TIMEOUT_SECS:-60}"
SKIP_BUILD="${SKIP_BUILD:-0}"         # 1: use binaries already built
DIRECT_ONLY="${DIRECT_ONLY:-0}"       # 1: no tollgate, measure the mock path only
BIN_DIR="${BIN_DIR:-$ROOT/target/release}"
TOLLGATE_BIN="${TOLLGATE_BIN:-$BIN_DIR/tollgate}"
EXTRA_CONFIG="${EXTRA_CONFIG:-}"      # TOML text appended to the generated config
RESULTS_DIR="$ROOT/bench/results"

for tool in python3 curl timeout; do
  command -v "$tool" >/dev/null || { echo "run.sh: needs $tool" >&2; exit 2; }
done

log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "FAILED: $*"; exit 1; }

# ---- children and cleanup ------------------------------------------------
TMP="$(mktemp -d /tmp/tollgate-bench.XXXXXX)"
CHILDREN=()
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
  if [[ -f "$TMP/tollgate.log" ]]; then
    mkdir -p "$RESULTS_DIR" && cp "$TMP/tollgate.log" "$RESULTS_DIR/tollgate.log"
  fi
  rm -rf "$TMP"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---- helpers -------------------------------------------------------------
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
check_tollgate() {
  [[ "$DIRECT_ONLY" == 1 ]] && return 0
  alive "$TG_PID" || { tail -n 30 "$TMP/tollgate.log" >&2; die "tollgate exited"; }
}
# Append loadgen's line to the raw results, tagged: record PHASE TARGET ROUND JSON.
record() {
  printf '{"phase":"%s","target":"%s","round":%s,%s\n' "$1" "$2" "$3" "${4#\{}" >>"$RAW"
}

# loadgen SECS ARGS...: one run, killed if it overstays its own bound.
loadgen() {
  local secs="$1"
  shift
  timeout --kill-after=5 "$(( ${secs%.*} + 30 ))" \
    "$BIN_DIR/loadgen" --duration-secs "$secs" --connections "$CONNECTIONS" \
    --workers "$LOADGEN_WORKERS" --gap-limit-ms "$((10 * STREAM_INTERVAL_MS))" "$@"
}

DIRECT_ARGS=()
VIA_ARGS=()
# run_target TARGET RATE SECS MODE: one load run against direct|via while
# sampling the CPU of the process under test and, via tollgate, its peak RSS.
# Prints loadgen's JSON line with cpu_ticks and rss_peak_kb added.
run_target() {
  local target="$1" rate="$2" secs="$3" mode="$4" pid body out
  local -a args
  if [[ "$target" == direct ]]; then
    pid="$MOCK_PID"; args=("${DIRECT_ARGS[@]}")
    body="$TMP/direct-$mode.json"
  else
    pid="$TG_PID"; args=("${VIA_ARGS[@]}")
    body="$TMP/via-$mode.json"
  fi
  out="$TMP/out.json"
  local before after peak=0 r lg
  before="$(cpu_ticks "$pid")"
  loadgen "$secs" "${args[@]}" --rate "$rate" --mode "$mode" --body-file "$body" >"$out" &
  lg=$!
  while alive "$lg"; do
    r="$(rss_kb "$pid")"
    ((r > peak)) && peak="$r"
    sleep 0.2
  done
  wait "$lg" || die "loadgen against $target exited with an error"
  after="$(cpu_ticks "$pid")"
  local line
  line="$(head -n 1 "$out")"
  [[ "$line" == \{* ]] || die "loadgen printed no result against $target"
  printf '%s,"cpu_ticks":%s,"rss_peak_kb":%s}\n' "${line%\}}" "$((after - before))" "$peak"
}

# ---- build ---------------------------------------------------------------
if [[ "$SKIP_BUILD" != 1 ]]; then
  log "building release binaries"
  if [[ "$DIRECT_ONLY" == 1 ]]; then
    (cd "$ROOT" && cargo build --release -p tollgate-bench)
  else
    (cd "$ROOT" && cargo build --release -p tollgate -p tollgate-bench)
  fi
fi
for bin in mock-upstream loadgen; do
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
printf '{"phase":"meta","date":"%s","git":"%s","cores":%s,"rounds":%s,"round_secs":%s,"frontier_secs":%s,"connections":%s,"clk_tck":%s,"frontier_p99_us":%s,"stream_rate":%s,"stream_chunks":%s,"stream_interval_ms":%s,"direct_only":%s,"quick":%s,"loadavg_start":%s}\n' \
  "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$GIT_REV" "$(nproc)" "$ROUNDS" "$ROUND_SECS" \
  "$FRONTIER_SECS" "$CONNECTIONS" "$CLK_TCK" "$FRONTIER_P99_US" "$STREAM_RATE" \
  "$STREAM_CHUNKS" "$STREAM_INTERVAL_MS" "$DIRECT_ONLY" "$QUICK" "$LOADAVG_START" >>"$RAW"

# ---- mock upstream -------------------------------------------------------
: >"$TMP/mock.out"
"$BIN_DIR/mock-upstream" --addr 127.0.0.1:0 --workers "$MOCK_WORKERS" \
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
DIRECT_ARGS=(--url "http://$MOCK_ADDR/v1/chat/completions")

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

# ---- tollgate ------------------------------------------------------------
if [[ "$DIRECT_ONLY" != 1 ]]; then
  mkdir -p "$TMP/db"
  CFG="$TMP/tollgate.toml"
  # Free ports come from binding port 0 and letting go, so another process
  # can take one before tollgate binds it; a bind failure is retried on fresh ports.
  for attempt in 1 2 3; do
    read -r HTTP_PORT GRPC_PORT < <(python3 -c '
import socket
socks = [socket.socket() for _ in range(2)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in socks])')
    cat >"$CFG" <<EOF
[server]
http_addr = "127.0.0.1:$HTTP_PORT"
grpc_addr = "127.0.0.1:$GRPC_PORT"
[log]
level = "warn"
[database]
url = "sqlite://$TMP/db/bench.db"
[[auth.static_keys]]
user = "bench"
key = "tg-bench-key"
[service_types.default]
models = ["*"]
[providers.up]
kind = "openai"
base_url = "http://$MOCK_ADDR/v1"
keys = ["sk-bench"]
EOF
    if [[ -n "$EXTRA_CONFIG" ]]; then printf '%s\n' "$EXTRA_CONFIG" >>"$CFG"; fi
    "$TOLLGATE_BIN" serve --config "$CFG" \
      --http-addr "127.0.0.1:$HTTP_PORT" --grpc-addr "127.0.0.1:$GRPC_PORT" \
      >"$TMP/tollgate.log" 2>&1 &
    TG_PID=$!
    CHILDREN+=("$TG_PID")
    TG_URL="http://127.0.0.1:$HTTP_PORT"
    deadline=$((SECONDS + READY_TIMEOUT_SECS))
    ready=0
    while alive "$TG_PID" && ((SECONDS < deadline)); do
      if [[ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 1 "$TG_URL/readyz" || true)" == 200 ]]; then
        ready=1
        break
      fi
      sleep 0.1
    done
    ((ready)) && break
    if ! alive "$TG_PID" && ((attempt < 3)) && grep -qiE 'in ?use' "$TMP/tollgate.log"; then
      log "tollgate could not bind port $HTTP_PORT or $GRPC_PORT; retrying on others"
      continue
    fi
    tail -n 30 "$TMP/tollgate.log" >&2
    die "tollgate not ready (exited, or no 200 from /readyz within $READY_TIMEOUT_SECS s)"
  done
  log "tollgate ready on $TG_URL (pid $TG_PID)"
  VIA_ARGS=(--url "$TG_URL/v1/chat/completions" --header "Authorization: Bearer tg-bench-key")

  # One request by hand first: a bench of 401s or 429s would measure nothing.
  for mode in plain stream; do
    code="$(curl -s -o "$TMP/probe.out" -w '%{http_code}' --max-time 10 \
      -H 'Authorization: Bearer tg-bench-key' -H 'Content-Type: application/json' \
      --data-binary "@$TMP/via-$mode.json" "$TG_URL/v1/chat/completions" || true)"
    [[ "$code" == 200 ]] || { head -c 500 "$TMP/probe.out" >&2; echo >&2; die "probe ($mode) via tollgate answered $code"; }
  done
  printf '{"phase":"rss","at":"idle","kb":%s}\n' "$(rss_kb "$TG_PID")" >>"$RAW"
fi

TARGETS=(direct)
[[ "$DIRECT_ONLY" == 1 ]] || TARGETS+=(via)

# Warm-up, unrecorded: opens connections and pools on both paths.
for t in "${TARGETS[@]}"; do line="$(run_target "$t" 200 1 plain)"; done
check_tollgate

# ---- interleaved A/B rounds ----------------------------------------------
for rate in $RATES; do
  for ((round = 1; round <= ROUNDS; round++)); do
    for t in "${TARGETS[@]}"; do
      log "A/B $rate RPS round $round/$ROUNDS: $t"
      line="$(run_target "$t" "$rate" "$ROUND_SECS" plain)"
      record ab "$t" "$round" "$line"
      check_tollgate
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
      check_tollgate
      step_ok "$line" && break
      ((attempt == 2)) && FAILED[$t]=1
    done
  done
  ((${#FAILED[@]} == ${#TARGETS[@]})) && break
done

# ---- streaming -----------------------------------------------------------
for ((round = 1; round <= ROUNDS; round++)); do
  for t in "${TARGETS[@]}"; do
    log "streaming round $round/$ROUNDS ($STREAM_RATE streams/s): $t"
    line="$(run_target "$t" "$STREAM_RATE" "$ROUND_SECS" stream)"
    record stream "$t" "$round" "$line"
    check_tollgate
  done
done

if [[ "$DIRECT_ONLY" != 1 ]]; then
  # Settling time before the after-load RSS reading; not a readiness wait.
  sleep 2
  printf '{"phase":"rss","at":"after","kb":%s}\n' "$(rss_kb "$TG_PID")" >>"$RAW"
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
