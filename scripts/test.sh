#!/usr/bin/env bash
# The default test suite (pytest's default markers: everything but real_lfw) and the
# linter. Both always run; the exit status is non-zero when either fails. Arguments go
# to pytest. Run it through scripts/with_test_services.sh (as `make test` does) to share
# one moto server and one Prefect server across the whole session.
set -uo pipefail
source "$(dirname "$0")/common.sh"
cd "$REPO_ROOT"

# Prefect's test harness and CLI state stay under ./var, never in ~/.prefect.
export PREFECT_HOME="${PREFECT_HOME:-$VAR_DIR/prefect-test}"
mkdir -p "$PREFECT_HOME"
# the venv installs the sagemaker extra: its tests must run, never skip
export FACEREID_REQUIRE_SAGEMAKER=1

"$VENV_BIN/pytest" "$@"
pytest_rc=$?
"$VENV_BIN/ruff" check .
ruff_rc=$?
log "pytest exit $pytest_rc, ruff check exit $ruff_rc"
((pytest_rc == 0 && ruff_rc == 0))
