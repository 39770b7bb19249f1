#!/usr/bin/env bash
# The local stack: Prefect server (UI + API on 127.0.0.1), the process work pool,
# every deployment in prefect.yaml, and one worker. Re-running it is safe; `make stop`
# (scripts/stop.sh) stops everything it started.
set -euo pipefail
source "$(dirname "$0")/common.sh"
cd "$REPO_ROOT"

PORT="${FACEREID_PREFECT_PORT:-4200}"
API_URL="http://127.0.0.1:$PORT/api"
export PREFECT_HOME="$VAR_DIR/prefect"   # sqlite database and profiles stay in ./var
mkdir -p "$PREFECT_HOME" "$STACK_DIR"
default_lfw_data_home

server_pid="$(read_pid "$STACK_DIR/server.pid")"
if [[ -n "$server_pid" ]]; then
  running_port="$(cat "$STACK_DIR/server.port" 2>/dev/null || echo "$PORT")"
  if [[ "$running_port" != "$PORT" ]]; then
    log "the Prefect server of an earlier make serve runs on port $running_port; make stop first"
    exit 1
  fi
  log "Prefect server already running (pid $server_pid)"
else
  if "$VENV_BIN/python" -c "import socket,sys; s=socket.socket(); sys.exit(s.connect_ex(('127.0.0.1', $PORT)) != 0)"; then
    log "port $PORT is taken by another process; use another one: PORT=4300 make serve"
    exit 1
  fi
  log "starting Prefect server on 127.0.0.1:$PORT (log: var/stack/server.log)"
  start_bg "$STACK_DIR/server.pid" "$STACK_DIR/server.log" \
    "$VENV_BIN/prefect" server start --host 127.0.0.1 --port "$PORT"
  server_pid="$(read_pid "$STACK_DIR/server.pid")"
  echo "$PORT" >"$STACK_DIR/server.port"
fi
if ! wait_http "$API_URL/health" 180 "$server_pid"; then
  tail -n 30 "$STACK_DIR/server.log" >&2 || true
  exit 1
fi
echo "$API_URL" >"$STACK_DIR/api_url"
export PREFECT_API_URL="$API_URL"

if "$VENV_BIN/prefect" work-pool inspect "$WORK_POOL" >/dev/null 2>&1; then
  log "work pool $WORK_POOL exists"
else
  log "creating work pool $WORK_POOL (type process)"
  "$VENV_BIN/prefect" work-pool create "$WORK_POOL" --type process >/dev/null
fi

log "deploying every deployment in prefect.yaml"
"$VENV_BIN/prefect" --no-prompt deploy --all

# flow runs inherit the worker's environment: a worker started with other FACEREID_*
# settings (another storage, backend, ...) is restarted, never silently kept
worker_env="$(env | grep '^FACEREID_' | sort || true)"
worker_pid="$(read_pid "$STACK_DIR/worker.pid")"
if [[ -n "$worker_pid" && "$(cat "$STACK_DIR/worker.env" 2>/dev/null)" != "$worker_env" ]]; then
  log "FACEREID_* settings changed since the worker started: restarting it"
  stop_pidfile "$STACK_DIR/worker.pid" "worker"
  worker_pid=""
fi
if [[ -n "$worker_pid" ]]; then
  log "worker already running (pid $worker_pid)"
else
  log "starting worker on pool $WORK_POOL (log: var/stack/worker.log)"
  printf '%s' "$worker_env" >"$STACK_DIR/worker.env"
  start_bg "$STACK_DIR/worker.pid" "$STACK_DIR/worker.log" \
    "$VENV_BIN/prefect" worker start --pool "$WORK_POOL" --name facereid-local-worker
fi

cat <<MSG

Local stack is up.
  UI:        http://127.0.0.1:$PORT
  API:       $API_URL
  Storage:   ${FACEREID_STORAGE_URI:-file://./var/storage}    LFW data_home: ${FACEREID_LFW_DATA_HOME:-sklearn default}
  Logs:      var/stack/server.log, var/stack/worker.log
Start a run from the UI (Deployments -> ingest-lfw -> Run -> Custom run) or:
  export PREFECT_API_URL=$API_URL PREFECT_HOME=$PREFECT_HOME
  .venv/bin/prefect deployment run 'ingest-lfw/ingest-lfw' --watch
  .venv/bin/prefect deployment run 'verify_pairs/verify-pairs-nightly' --param list_key=incoming/my-pairs.csv
Drop a pair list (poll-incoming notices it within 5 min and triggers verify-pairs-on-drop):
  .venv/bin/facereid drop my-pairs.csv
Stop everything with: make stop
MSG
