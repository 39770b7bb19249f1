# shellcheck shell=bash
# Shared helpers for the local stack and the test services (sourced, not run).
#
# Everything this project starts writes under ./var (logs, pid files, sqlite),
# so nothing lands in ~/.prefect and `make stop` can find what `make serve` started.

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV_BIN="${VENV_BIN:-$REPO_ROOT/.venv/bin}"
VAR_DIR="$REPO_ROOT/var"
STACK_DIR="$VAR_DIR/stack"               # pid files and logs of `make serve`
WORK_POOL="${FACEREID_WORK_POOL:-facereid-process}"  # must match prefect.yaml

# Quiet, offline-friendly Prefect defaults for every process we start.
export PREFECT_SERVER_ANALYTICS_ENABLED="${PREFECT_SERVER_ANALYTICS_ENABLED:-false}"
export DO_NOT_TRACK="${DO_NOT_TRACK:-1}"

log() { printf '[%s] %s\n' "$(basename "$0")" "$*" >&2; }

# Default LFW location: the offline copy next to the checkout, when present.
default_lfw_data_home() {
  if [[ -z "${FACEREID_LFW_DATA_HOME:-}" && -f "$REPO_ROOT/../shared/data/lfw_home/pairs.txt" ]]; then
    FACEREID_LFW_DATA_HOME="$(cd "$REPO_ROOT/../shared/data" && pwd)"
    export FACEREID_LFW_DATA_HOME
  fi
}

free_port() {
  "$VENV_BIN/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# wait_http URL TIMEOUT_S PID: until URL answers 200, the process dies, or the time is up.
wait_http() {
  local url="$1" timeout="$2" pid="${3:-}" deadline=$((SECONDS + $2))
  while ((SECONDS < deadline)); do
    if "$VENV_BIN/python" - "$url" <<'PY' 2>/dev/null; then return 0; fi
import sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=2) as r:
    sys.exit(0 if r.status == 200 else 1)
PY
    if [[ -n "$pid" ]] && ! kill -0 "$pid" 2>/dev/null; then
      log "process $pid exited while waiting for $url"
      return 1
    fi
    sleep 0.5
  done
  log "timed out after ${timeout}s waiting for $url"
  return 1
}

# start_bg PIDFILE LOGFILE CMD...: run CMD in its own session (process group = its pid).
start_bg() {
  local pidfile="$1" logfile="$2"
  shift 2
  mkdir -p "$(dirname "$pidfile")" "$(dirname "$logfile")"
  setsid "$@" >>"$logfile" 2>&1 </dev/null &
  local pid=$!
  echo "$pid $(proc_start "$pid")" >"$pidfile"
}

pid_alive() { [[ -n "${1:-}" ]] && kill -0 "$1" 2>/dev/null; }

# proc_start PID: the process's start time (clock ticks since boot), empty if gone. A pid
# file records it, so a pid reused after a reboot is never mistaken for our process.
proc_start() {
  local stat
  stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 0
  stat="${stat##*) }"  # drop "pid (comm) ": comm may hold spaces
  awk '{print $20}' <<<"$stat"
}

# read_pid PIDFILE: the pid recorded in PIDFILE if that very process still runs, else "".
read_pid() {
  local pid start
  [[ -f "$1" ]] || return 0
  read -r pid start <"$1" || true
  if pid_alive "$pid" && [[ -z "$start" || "$(proc_start "$pid")" == "$start" ]]; then
    echo "$pid"
  fi
}

# descendants PID: every process below PID (children first found, then theirs), one per line.
descendants() {
  local all queue=("$1") next child
  all="$(ps -e -o pid=,ppid=)"
  while ((${#queue[@]})); do
    next=("${queue[@]}")
    queue=()
    for p in "${next[@]}"; do
      for child in $(awk -v p="$p" '$2 == p {print $1}' <<<"$all"); do
        echo "$child"
        queue+=("$child")
      done
    done
  done
}

# kill_tree PID [GRACE_S]: TERM PID's process group and every descendant (Prefect starts
# flow runs in sessions of their own, so the group alone is not enough), then KILL leftovers.
kill_tree() {
  local pid="$1" grace="${2:-10}" deadline p alive
  pid_alive "$pid" || return 0
  local pids=("$pid" $(descendants "$pid"))
  for p in "${pids[@]}"; do
    kill -TERM -- "-$p" 2>/dev/null || kill -TERM "$p" 2>/dev/null || true
  done
  deadline=$((SECONDS + grace))
  while ((SECONDS < deadline)); do
    alive=0
    for p in "${pids[@]}"; do pid_alive "$p" && alive=1; done
    ((alive)) || break
    sleep 0.2
  done
  for p in "${pids[@]}"; do
    kill -KILL -- "-$p" 2>/dev/null || true
    kill -KILL "$p" 2>/dev/null || true
  done
}

# stop_pidfile PIDFILE NAME: stop the process group recorded in PIDFILE and remove it.
stop_pidfile() {
  local pidfile="$1" name="$2" pid
  [[ -f "$pidfile" ]] || return 0
  pid="$(read_pid "$pidfile")"
  if [[ -n "$pid" ]]; then
    log "stopping $name (process group $pid)"
    kill_tree "$pid" 15
  fi
  rm -f "$pidfile"
}
