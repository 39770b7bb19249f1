#!/usr/bin/env bash
# Stop what scripts/serve.sh started: the worker (and any flow runs it spawned), then
# the Prefect server. Leaves nothing running.
set -euo pipefail
source "$(dirname "$0")/common.sh"

stop_pidfile "$STACK_DIR/worker.pid" "worker"
stop_pidfile "$STACK_DIR/server.pid" "Prefect server"
rm -f "$STACK_DIR/api_url" "$STACK_DIR/server.port" "$STACK_DIR/worker.env"
log "local stack stopped"
