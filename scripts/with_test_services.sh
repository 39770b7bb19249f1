#!/usr/bin/env bash
# Run a command with the services the test suite needs, started once for the whole run:
#   - a moto S3 server on a free loopback port   -> FACEREID_TEST_S3_ENDPOINT
#   - a Prefect server on a free loopback port    -> FACEREID_TEST_PREFECT_API_URL
# A service whose variable is already set is left alone (the caller owns it). Everything
# started here is stopped on exit, whatever the command's outcome; the command's exit
# status is returned. Logs go to var/test-services/.
set -euo pipefail
source "$(dirname "$0")/common.sh"
cd "$REPO_ROOT"

if (($# == 0)); then
  echo "usage: $0 COMMAND [ARGS...]" >&2
  exit 2
fi

RUN_DIR="$VAR_DIR/test-services/$$"
mkdir -p "$RUN_DIR"
started=()

cleanup() {
  local rc=$?
  for pidfile in "${started[@]}"; do
    [[ -f "$pidfile" ]] && kill_tree "$(read_pid "$pidfile")" 10
  done
  rm -rf "$RUN_DIR/prefect-home"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if [[ -z "${FACEREID_TEST_S3_ENDPOINT:-}" ]]; then
  port="$(free_port)"
  start_bg "$RUN_DIR/moto.pid" "$RUN_DIR/moto.log" "$VENV_BIN/moto_server" -H 127.0.0.1 -p "$port"
  started+=("$RUN_DIR/moto.pid")
  wait_http "http://127.0.0.1:$port/moto-api/" 60 "$(read_pid "$RUN_DIR/moto.pid")" \
    || { tail -n 20 "$RUN_DIR/moto.log" >&2; exit 1; }
  export FACEREID_TEST_S3_ENDPOINT="http://127.0.0.1:$port"
  log "moto S3 server at $FACEREID_TEST_S3_ENDPOINT"
fi

if [[ -z "${FACEREID_TEST_PREFECT_API_URL:-}" ]]; then
  port="$(free_port)"
  mkdir -p "$RUN_DIR/prefect-home"
  start_bg "$RUN_DIR/prefect.pid" "$RUN_DIR/prefect.log" \
    env PREFECT_HOME="$RUN_DIR/prefect-home" PREFECT_UI_ENABLED=false \
    "$VENV_BIN/prefect" server start --host 127.0.0.1 --port "$port"
  started+=("$RUN_DIR/prefect.pid")
  wait_http "http://127.0.0.1:$port/api/health" 180 "$(read_pid "$RUN_DIR/prefect.pid")" \
    || { tail -n 30 "$RUN_DIR/prefect.log" >&2; exit 1; }
  export FACEREID_TEST_PREFECT_API_URL="http://127.0.0.1:$port/api"
  log "Prefect server at $FACEREID_TEST_PREFECT_API_URL"
fi

"$@"
