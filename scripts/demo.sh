#!/usr/bin/env bash
# The main job on the embedded default: local storage root ./var/storage, local backend,
# LFW from ../shared/data when that copy exists. Prefect is ephemeral (a temporary server
# for the run, state under ./var/prefect-demo) unless `make serve` is up, in which case
# the runs go to that server and show in its UI. Extra arguments go to `facereid demo`.
set -euo pipefail
source "$(dirname "$0")/common.sh"
cd "$REPO_ROOT"

default_lfw_data_home
export FACEREID_STORAGE_URI="${FACEREID_STORAGE_URI:-file://./var/storage}"
export FACEREID_BACKEND="${FACEREID_BACKEND:-local}"

server_pid="$(read_pid "$STACK_DIR/server.pid")"
if [[ -z "${PREFECT_API_URL:-}" && -n "$server_pid" && -f "$STACK_DIR/api_url" ]]; then
  export PREFECT_HOME="$VAR_DIR/prefect"
  PREFECT_API_URL="$(cat "$STACK_DIR/api_url")"
  export PREFECT_API_URL
  log "using the local stack at $PREFECT_API_URL"
else
  export PREFECT_HOME="${PREFECT_HOME:-$VAR_DIR/prefect-demo}"
  mkdir -p "$PREFECT_HOME"
fi
log "storage=$FACEREID_STORAGE_URI backend=$FACEREID_BACKEND lfw=${FACEREID_LFW_DATA_HOME:-sklearn default}"
exec "$VENV_BIN/facereid" demo "$@"
