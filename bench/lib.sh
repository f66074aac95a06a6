# Shared by bench/run.sh and bench/soak.sh, sourced once their knobs are set: logging, pinning,
# the children and their cleanup, figures of a process from /proc, and starting the servers
# (the mocks and bare proxy, which print "listening ADDR", and tollgate). Sourcing it makes the
# temporary directory ($TMP) and sets the exit trap that stops every child.
#
# Reads: ROOT, RESULTS_DIR, LOG_TAG, PIN, DB, BENCH_PG_URL, BENCH_REDIS_URL, BIN_DIR,
# TOLLGATE_BIN, EXTRA_CONFIG, READY_TIMEOUT_SECS, LEASE_FRACTION, POOL_IDLE_SECS; MOCK_ADDR (and IDLE_ADDR, when
# an idle mock runs) by the time tollgate starts; the caller's PID_OF/URL_OF maps, which
# start_tollgate and start_baseline fill in (with DB_URL_OF and GRPC_URL_OF, declared here).

log() { printf '[%s %s] %s\n' "$LOG_TAG" "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "FAILED: $*"; exit 1; }

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

# Hundreds of concurrent streams through a proxy take two sockets each, plus the load
# generator's; the usual soft limit of 1024 descriptors is too few.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || ulimit -n 65536 2>/dev/null || true

# ---- children and cleanup ------------------------------------------------
TMP="$(mktemp -d "/tmp/tollgate-$LOG_TAG.XXXXXX")"
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
  local rc=$? pid db f
  trap - EXIT INT TERM
  for pid in "${CHILDREN[@]}"; do stop_pid "$pid"; done
  for db in "${PG_DBS[@]}"; do
    psql -q "$BENCH_PG_URL" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1 || true
  done
  mkdir -p "$RESULTS_DIR"
  for f in "$TMP"/tg-*.log; do
    [[ -f "$f" ]] && cp "$f" "$RESULTS_DIR/${LOG_PREFIX:-}$(basename "$f")"
  done
  rm -rf "$TMP"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---- figures of a process ------------------------------------------------
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
# Open file descriptors of a process (its sockets, mostly).
fd_count() {
  local fds=("/proc/$1/fd/"*)
  echo "${#fds[@]}"
}
alive() { kill -0 "$1" 2>/dev/null; }
# "STEAL ALL": the machine's CPU ticks the host stole (a VM's vCPU descheduled) and all of
# them, from /proc/stat; two readings give the share stolen between them.
host_ticks() {
  local _c u n sy id io irq sirq st _rest
  read -r _c u n sy id io irq sirq st _rest </proc/stat
  echo "$st $((u + n + sy + id + io + irq + sirq + st))"
}
# steal_pct "BEFORE" "AFTER": the share of the CPU stolen between two host_ticks readings.
steal_pct() {
  local s0 a0 s1 a1
  read -r s0 a0 <<<"$1"
  read -r s1 a1 <<<"$2"
  awk -v s=$((s1 - s0)) -v a=$((a1 - a0)) 'BEGIN {printf "%.1f\n", (a > 0 ? 100 * s / a : 0)}'
}

declare -A DB_URL_OF=() GRPC_URL_OF=()

# ledger_rows NAME [SQL_CONDITION]: rows in the ledger of tollgate NAME (matching the condition).
ledger_rows() {
  local url="${DB_URL_OF[$1]}" sql="SELECT count(*) FROM usage_ledger WHERE ${2:-true}"
  if [[ "$url" == sqlite://* ]]; then
    python3 -c 'import sqlite3, sys; print(sqlite3.connect(sys.argv[1], timeout=10).execute(sys.argv[2]).fetchone()[0])' \
      "${url#sqlite://}" "$sql" 2>/dev/null || echo -1
  else
    psql -qtA "$url" -c "$sql" 2>/dev/null || echo -1
  fi
}

# ---- starting servers ----------------------------------------------------
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

# start_listener NAME CMD...: starts CMD in the background (stdout to $TMP/NAME.out, stderr to
# $TMP/NAME.log), registers it as a child, and waits up to 10 s for its first stdout line
# "listening ADDR". Sets LISTEN_PID and LISTEN_ADDR.
start_listener() {
  local name="$1" word addr deadline
  shift
  : >"$TMP/$name.out"
  "$@" >"$TMP/$name.out" 2>"$TMP/$name.log" &
  LISTEN_PID=$!
  CHILDREN+=("$LISTEN_PID")
  LISTEN_ADDR=""
  deadline=$((SECONDS + 10))
  while [[ -z "$LISTEN_ADDR" ]]; do
    alive "$LISTEN_PID" || { cat "$TMP/$name.log" >&2; die "$name exited"; }
    ((SECONDS < deadline)) || die "$name did not report its address in 10 s"
    read -r word addr <"$TMP/$name.out" 2>/dev/null || true
    if [[ "${word:-}" == listening ]]; then LISTEN_ADDR="$addr"; else sleep 0.05; fi
  done
}

# start_baseline TARGET BIN UPSTREAM: a baseline server (bare-proxy, grpc-bare) on the SUT core
# in front of UPSTREAM (host:port) as target TARGET; sets PID_OF[TARGET] and LISTEN_ADDR.
start_baseline() {
  start_listener "$1" "${ON_SUT[@]}" "$BIN_DIR/$2" --addr 127.0.0.1:0 --upstream "$3"
  PID_OF[$1]="$LISTEN_PID"
}

# database_url NAME: a fresh database for one tollgate (dropped on exit when PostgreSQL).
database_url() {
  local name="$1"
  if [[ "$DB" == sqlite ]]; then
    mkdir -p "$TMP/db-$name"
    echo "sqlite://$TMP/db-$name/bench.db"
  else
    local db="tg_bench_${name//[^a-zA-Z0-9]/_}_$$"
    psql -q "$BENCH_PG_URL" -c "CREATE DATABASE $db" >/dev/null || die "cannot create database $db"
    PG_DBS+=("$db")
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
      # The idle streams are priced too, so that they hold a budget reservation like any other.
      if [[ -n "${IDLE_ADDR:-}" ]]; then
        printf '[pricing."idle/gpt-bench"]\ninput_usd_per_mtok = 0.15\noutput_usd_per_mtok = 0.60\n'
      fi
      # LEASE_FRACTION=0: every budgeted request reserves in the database (default: leases, 0.1).
      if [[ -n "${LEASE_FRACTION:-}" ]]; then
        printf '[budgets]\nlease_fraction = %s\n' "$LEASE_FRACTION"
      fi
      ;;
    *) die "unknown profile $1 (min, full or redis)" ;;
  esac
}

# start_tollgate PROFILE [NAME [DATABASE_URL]]: tollgate with PROFILE's configuration as target
# NAME (default tg-PROFILE) on a fresh database, or on DATABASE_URL (a restart on the same data).
# Its config is $TMP/NAME.toml, its log $TMP/NAME.log.
start_tollgate() {
  local profile="$1" name="${2:-tg-$1}" url="${3:-}" cfg http grpc pid attempt
  [[ -n "$url" ]] || url="$(database_url "$name")"
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
idle_connection_timeout_secs = ${POOL_IDLE_SECS:-10}
[[auth.static_keys]]
user = "bench"
key = "tg-bench-key"
[providers.up]
kind = "openai"
base_url = "http://$MOCK_ADDR/v1"
keys = ["sk-bench"]
pool_idle_timeout_secs = ${POOL_IDLE_SECS:-10}
[service_types.default]
models = ["*"]
$(profile_config "$profile")
EOF
    # Streams that send their first chunk and then nothing (the idle-stream phase).
    if [[ -n "${IDLE_ADDR:-}" ]]; then
      printf '[providers.idle]\nkind = "openai"\nbase_url = "http://%s/v1"\nkeys = ["sk-bench"]\n' "$IDLE_ADDR" >>"$cfg"
    fi
    if [[ -n "$EXTRA_CONFIG" ]]; then printf '%s\n' "$EXTRA_CONFIG" >>"$cfg"; fi
    "${ON_SUT[@]}" "$TOLLGATE_BIN" serve --config "$cfg" >>"$TMP/$name.log" 2>&1 &
    pid=$!
    CHILDREN+=("$pid")
    if wait_ready "$name" "$pid" "http://127.0.0.1:$http/readyz"; then
      PID_OF[$name]="$pid"
      URL_OF[$name]="http://127.0.0.1:$http"
      GRPC_URL_OF[$name]="http://127.0.0.1:$grpc"
      DB_URL_OF[$name]="$url"
      log "tollgate ($profile, $DB) as $name on http://127.0.0.1:$http (pid $pid)"
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
