#!/usr/bin/env bash
# Run every benchmark once with its defaults; everything printed also goes to
# bench/results/latest.txt, with the machine described at the top. Each script judges its own
# target (MET / MISSED) and exits 0; a non-zero exit means the harness itself broke.
# Usage: bench/run_all.sh ["script [options]" ...]   (default: all, in the order below: each
# script at the defaults, and the delivery ones again with batches of 50 as well)
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
mkdir -p bench/results
OUT=bench/results/latest.txt
SCRIPTS=("$@")
if [ ${#SCRIPTS[@]} -eq 0 ]; then
  SCRIPTS=(produce api "deliver_fast --batch-sizes 1,50" deliver_slow
           "deliver_slow --batch-size 50 --backlog 20000 --window 6" latency
           "latency --batch-size 50" rate_limit "rate_limit --batch-size 50" pacing_floor acks xmp
           memory)
fi

{
  echo "postback-relay benchmarks, $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo '?')" \
    "($(git status --porcelain -- . ':(exclude)bench' 2>/dev/null | wc -l) changed path(s) outside bench/)"
  echo "machine: nproc=$(nproc), cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')," \
    "$(awk '/MemTotal/ {printf "%.0f GB RAM", $2 / 1048576}' /proc/meminfo)"
  echo "python: $("$PY" -V 2>&1), redis-server: $("$PY" -c 'from workers.dev.embedded_redis import redis_server_binary; print(redis_server_binary())' 2>/dev/null)"
  echo "REDIS_URL: ${REDIS_URL:-unset (embedded redis-server per script)}"
  echo "arq + httpx reference (deliver_fast, deliver_slow):" \
    "$("$PY" -c 'import sys; sys.path.insert(0, "bench"); import common; print(common.arq_describe())' 2>&1 | tail -1)"
  echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
  for entry in "${SCRIPTS[@]}"; do
    read -r script options <<<"$entry"
    started=$(date +%s)
    # shellcheck disable=SC2086  # the options are words
    "$PY" "bench/$script.py" $options
    code=$?
    echo "  ($script.py $options: $(($(date +%s) - started)) s, exit $code)"
  done
} 2>&1 | tee "$OUT"
