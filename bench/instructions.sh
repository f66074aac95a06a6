#!/usr/bin/env bash
# Instructions and heap allocations a request, counted by valgrind's callgrind: the bare proxy,
# tollgate "min" and "full" (bench/lib.sh's profiles) each serve the same chat completions
# under callgrind, and the report gives each target's user-space instructions and allocator
# calls a request, and tollgate's as a ratio to the bare proxy's. Unlike CPU time, the counts
# do not move with a busy or stolen host, so two builds can be told apart by a few percent
# (bench/README.md, "Instructions a request").
#
#   bash bench/instructions.sh                     # bare, min, full; 2,000 requests each
#   REQUESTS=4000 PROFILES=full bash bench/instructions.sh
#   TOLLGATE_BIN=/tmp/tollgate-before bash bench/instructions.sh   # another build
#
# Needs valgrind (callgrind_control), python3 and curl. Talks only to 127.0.0.1.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REQUESTS="${REQUESTS:-2000}"          # counted requests per target
RATE="${RATE:-200}"                   # requests/s (a target under callgrind is ~50x slower)
PROFILES="${PROFILES:-min full}"
SKIP_BUILD="${SKIP_BUILD:-0}"
BIN_DIR="${BIN_DIR:-$ROOT/target/release}"
TOLLGATE_BIN="${TOLLGATE_BIN:-$BIN_DIR/tollgate}"
RESULTS_DIR="${RESULTS_DIR:-$ROOT/bench/results}"
# What bench/lib.sh reads.
LOG_TAG=instructions PIN=0 DB=sqlite EXTRA_CONFIG="" READY_TIMEOUT_SECS=180 POOL_IDLE_SECS=60
BENCH_PG_URL="" BENCH_REDIS_URL=""

command -v callgrind_control >/dev/null || {
  echo "instructions.sh needs valgrind (Debian: apt-get install valgrind)" >&2
  exit 1
}
if [[ "$SKIP_BUILD" != 1 ]]; then
  (cd "$ROOT" && cargo build --release -q -p tollgate -p tollgate-bench)
fi
mkdir -p "$RESULTS_DIR"
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"
declare -A PID_OF=() URL_OF=()

start_listener mock "$BIN_DIR/mock-upstream" --addr 127.0.0.1:0 --workers 1
MOCK_ADDR="$LISTEN_ADDR"
# Every server under test runs under callgrind, counting from the start of the counted load.
ON_SUT=(valgrind -q --tool=callgrind --callgrind-out-file="$TMP/callgrind.%p")

# count TARGET PID URL MODEL [HEADER]: warms TARGET up, counts REQUESTS requests, and prints
# one JSON line of its figures.
count() {
  local target="$1" pid="$2" url="$3" model="$4" out ok errors
  shift 4
  local body="$TMP/body-$target.json"
  printf '{"model":"%s","messages":[{"role":"user","content":"hello"}],"max_tokens":64}' \
    "$model" >"$body"
  local load=("$BIN_DIR/loadgen" --connections 16 --workers 1 --url "$url/v1/chat/completions"
    --mode plain --body-file "$body" --rate "$RATE" "$@")
  # Warm-up: connections, caches and lazily made series exist before the count starts.
  "${load[@]}" --duration-secs 3 >/dev/null
  callgrind_control -z "$pid" >/dev/null
  out="$("${load[@]}" --duration-secs $((REQUESTS / RATE)))"
  callgrind_control -d "$pid" >/dev/null
  ok="$(field "$out" ok)"
  errors="$(field "$out" errors)"
  ((errors == 0)) || die "$target: $errors of the counted requests failed"
  local dump="$TMP/callgrind.$pid.1" deadline=$((SECONDS + 30))
  until grep -q '^totals:' "$dump" 2>/dev/null; do
    ((SECONDS < deadline)) || die "$target: callgrind wrote no dump"
    sleep 0.2
  done
  python3 - "$dump" "$target" "$ok" <<'EOF'
import json, re, sys
dump, target, ok = sys.argv[1], sys.argv[2], int(sys.argv[3])
total, calls, fn = 0, 0, ""
names = {}
# Allocator entry points: glibc's (the bare proxy) and mimalloc's (tollgate).
alloc = re.compile(r"^(malloc|calloc|realloc|mi_malloc|mi_zalloc|mi_realloc|mi_malloc_aligned|mi_zalloc_aligned|mi_realloc_aligned)$")
cfn = None
for line in open(dump, errors="replace"):
    if line.startswith("totals:"):
        total = int(line.split()[1])
    m = re.match(r"^c?fn=\((\d+)\)(?: (.*))?", line)
    if m:
        if m[2]:
            names[m[1]] = m[2].strip()
        if line.startswith("cfn="):
            cfn = names.get(m[1], "")
        continue
    m = re.match(r"^calls=(\d+)", line)
    if m and cfn is not None and alloc.match(cfn):
        calls += int(m[1])
print(json.dumps({"target": target, "requests": ok, "instructions": total // ok,
                  "allocations": round(calls / ok, 1)}))
EOF
}

RESULTS="$RESULTS_DIR/instructions.jsonl"
: >"$RESULTS"
start_baseline bare bare-proxy "$MOCK_ADDR"
log "bare: counting $REQUESTS requests"
count bare "${PID_OF[bare]}" "http://$LISTEN_ADDR" gpt-bench >>"$RESULTS"
stop_pid "${PID_OF[bare]}"
for profile in $PROFILES; do
  start_tollgate "$profile"
  log "tg-$profile: counting $REQUESTS requests"
  count "tg-$profile" "${PID_OF[tg-$profile]}" "${URL_OF[tg-$profile]}" up/gpt-bench \
    --header "Authorization: Bearer tg-bench-key" >>"$RESULTS"
  stop_pid "${PID_OF[tg-$profile]}"
done

python3 - "$RESULTS" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
bare = rows[0]
print(f"{'target':<8} {'instructions a request':>24} {'x bare':>7} {'allocations a request':>22}")
for r in rows:
    ratio = r["instructions"] / bare["instructions"]
    print(f"{r['target']:<8} {r['instructions']:>24,} {ratio:>6.2f}x {r['allocations']:>22}")
EOF
