#!/usr/bin/env bash
# Local Prefect setup for gprune: a server on 127.0.0.1 (SQLite, telemetry off), the process
# work pool, the deployments of prefect.yaml, and a worker; everything offline.
#
#   scripts/prefect_local.sh up        # start the server (background), wait until healthy
#   scripts/prefect_local.sh pool      # create the process work pool (idempotent)
#   scripts/prefect_local.sh deploy    # pool + `prefect deploy --all` (deployments full, nightly)
#   scripts/prefect_local.sh worker    # start a process worker (background)
#   scripts/prefect_local.sh run [ARGS]  # prefect deployment run gprune/full --watch [ARGS]
#   scripts/prefect_local.sh status    # what is running
#   scripts/prefect_local.sh down      # stop the worker and the server (only what this script started)
#   scripts/prefect_local.sh env       # print the exports to use the server from a shell
#
# Settings (environment): GPRUNE_PREFECT_STATE (state dir: pid files, logs, SQLite database,
# PREFECT_HOME; default <repo>/.gprune/prefect), GPRUNE_PREFECT_PORT (4200), GPRUNE_POOL
# (gprune-process), GPRUNE_PYTHON (default <repo>/.venv/bin/python, else python3).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE="${GPRUNE_PREFECT_STATE:-$REPO/.gprune/prefect}"
PORT="${GPRUNE_PREFECT_PORT:-4200}"
POOL="${GPRUNE_POOL:-gprune-process}"
if [[ -z "${GPRUNE_PYTHON:-}" ]]; then
  if [[ -x "$REPO/.venv/bin/python" ]]; then GPRUNE_PYTHON="$REPO/.venv/bin/python"; else GPRUNE_PYTHON=python3; fi
fi
PREFECT=("$GPRUNE_PYTHON" -m prefect)

mkdir -p "$STATE/home"
export PREFECT_HOME="$STATE/home"
export PREFECT_API_URL="http://127.0.0.1:$PORT/api"
export PREFECT_SERVER_API_HOST=127.0.0.1
export PREFECT_SERVER_API_PORT="$PORT"
export PREFECT_API_DATABASE_CONNECTION_URL="sqlite+aiosqlite:///$STATE/prefect.db"
export PREFECT_SERVER_ANALYTICS_ENABLED=false
export DO_NOT_TRACK=1
export HF_HUB_OFFLINE=1
export HF_DATASETS_OFFLINE=1
export TOKENIZERS_PARALLELISM=false
export PREFECT_LOGGING_EXTRA_LOGGERS="${PREFECT_LOGGING_EXTRA_LOGGERS:-gprune}"
export GPRUNE_PROJECT_DIR="$REPO"

log() { echo "prefect_local: $*" >&2; }

alive() {  # alive PID -> 0 when the process exists and is not a zombie
  kill -0 "$1" 2>/dev/null || return 1
  [[ ! -r "/proc/$1/stat" ]] || [[ "$(cut -d' ' -f3 "/proc/$1/stat" 2>/dev/null)" != Z ]]
}

running() {  # running NAME -> 0 when the process of NAME.pid is alive
  local pidfile="$STATE/$1.pid"
  [[ -f "$pidfile" ]] && alive "$(cat "$pidfile")"
}

start_bg() {  # start_bg NAME CMD... : own session (process group), pid file, log file
  local name="$1"; shift
  if running "$name"; then log "$name already running (pid $(cat "$STATE/$name.pid"))"; return 0; fi
  setsid "$@" >"$STATE/$name.log" 2>&1 < /dev/null &
  echo $! >"$STATE/$name.pid"
  log "$name started (pid $!, log $STATE/$name.log)"
}

stop_bg() {  # stop_bg NAME : signal the process group twice (a worker needs two), then KILL
  local pidfile="$STATE/$1.pid" pid
  [[ -f "$pidfile" ]] || return 0
  pid="$(cat "$pidfile")"
  if alive "$pid"; then
    for step in INT:4 INT:20 TERM:20 KILL:4; do  # signal:half-seconds to wait
      kill -s "${step%%:*}" -- "-$pid" 2>/dev/null || kill -s "${step%%:*}" "$pid" 2>/dev/null || true
      for _ in $(seq 1 "${step##*:}"); do alive "$pid" || break; sleep 0.5; done
      alive "$pid" || break
    done
    kill -s KILL -- "-$pid" 2>/dev/null || true  # leftovers of the group (flow-run children)
    log "$1 stopped (pid $pid)"
  fi
  rm -f "$pidfile"
}

healthy() {
  "$GPRUNE_PYTHON" - "$PREFECT_API_URL/health" <<'EOF' >/dev/null 2>&1
import sys, urllib.request
urllib.request.urlopen(sys.argv[1], timeout=2).read()
EOF
}

cmd_up() {
  if ! running server; then
    start_bg server "${PREFECT[@]}" server start --host 127.0.0.1 --port "$PORT" --analytics-off
  fi
  for _ in $(seq 1 120); do
    if healthy; then log "server ready at $PREFECT_API_URL (UI http://127.0.0.1:$PORT)"; return 0; fi
    running server || { log "server exited; see $STATE/server.log"; tail -20 "$STATE/server.log" >&2; return 1; }
    sleep 0.5
  done
  log "server not healthy after 60 s; see $STATE/server.log"; return 1
}

cmd_pool() {
  healthy || { log "no server at $PREFECT_API_URL; run: $0 up"; return 1; }
  if "${PREFECT[@]}" work-pool inspect "$POOL" >/dev/null 2>&1; then
    log "work pool $POOL exists"
  else
    "${PREFECT[@]}" work-pool create "$POOL" --type process >/dev/null
    log "work pool $POOL created"
  fi
}

cmd_deploy() {
  cmd_pool
  (cd "$REPO" && "${PREFECT[@]}" --no-prompt deploy --all)
}

cmd_worker() {
  healthy || { log "no server at $PREFECT_API_URL; run: $0 up"; return 1; }
  start_bg worker "${PREFECT[@]}" worker start --pool "$POOL" --type process --name "gprune-local-$$"
}

cmd_run() {
  (cd "$REPO" && "${PREFECT[@]}" deployment run gprune/full --watch "$@")
}

cmd_status() {
  for name in server worker; do
    if running "$name"; then echo "$name: running (pid $(cat "$STATE/$name.pid"))"; else echo "$name: stopped"; fi
  done
  echo "api: $PREFECT_API_URL  state: $STATE"
}

cmd_down() { stop_bg worker; stop_bg server; }

cmd_env() {
  echo "export PREFECT_API_URL=$PREFECT_API_URL PREFECT_HOME=$PREFECT_HOME DO_NOT_TRACK=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1"
}

case "${1:-}" in
  up|pool|deploy|worker|status|down|env) "cmd_$1" ;;
  run) shift; cmd_run "$@" ;;
  *) sed -n '2,16p' "$0"; exit 2 ;;
esac
